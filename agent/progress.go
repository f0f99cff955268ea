package agent

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/criurun"
)

// Progress of an operation, as the webhook quotes it in its 429 to the evicting client: where a
// waiting dump is in the node's queue, how far a running one is.

// progress fills the status' place in the queue and the message. Called with op.mu held.
func (op *operation) progress(s *agentapi.CheckpointStatus) {
	switch s.Phase {
	case agentapi.PhasePending:
		if op.sched == nil || op.waiter == nil {
			return
		}
		ahead, running, limit := op.sched.place(op.waiter)
		if ahead < 0 {
			return
		}
		s.Ahead = ahead
		s.Message = fmt.Sprintf("queued on node %s: %d dump(s) ahead (%d running, %d at once now)", s.Node, ahead, running, limit)
	case agentapi.PhaseRunning:
		if s.ExpectedBytes > 0 {
			s.Message = fmt.Sprintf("dumping: %s of ~%s", agentapi.HumanBytes(s.BytesWritten), agentapi.HumanBytes(s.ExpectedBytes))
		} else {
			s.Message = fmt.Sprintf("dumping: %s", agentapi.HumanBytes(s.BytesWritten))
		}
	}
}

// treeAnonBytes estimates what dumping the tree under root writes: its processes' anonymous and
// shared-anonymous resident memory (what CRIU copies into pages images; file-backed pages are not
// dumped). Memory shared between processes counts once per process, so it is an upper estimate.
func treeAnonBytes(root int) int64 {
	var kib int64
	for _, p := range criurun.Descendants(root) {
		st, err := procStatus(strconv.Itoa(p))
		if err != nil {
			continue
		}
		for _, k := range []string{"RssAnon", "RssShmem"} {
			if n, err := strconv.ParseInt(strings.TrimSuffix(st[k], " kB"), 10, 64); err == nil {
				kib += n
			}
		}
	}
	return kib << 10
}
