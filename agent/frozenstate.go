package agent

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/criurun"
)

// Frozen apps outlive the agent: a DaemonSet rollout, a crash or an OOM kill of the agent must not
// leave an app stopped for good, nor lose the answer the webhook is waiting for. Each operation
// that froze apps is recorded on the node (Config.StateDir, tmpfs /run: a reboot ends the frozen
// processes and their records together); a restarted agent adopts the operations whose trees are
// still there (same PID and start time), so the webhook's next question gets the checkpoint it
// was waiting for, and watches them as holdFrozen does. A record whose trees are gone is removed.

// frozenRecord is what the node keeps of an operation that froze apps.
type frozenRecord struct {
	Status   agentapi.CheckpointStatus `json:"status"`
	Trees    []frozenTreeRecord        `json:"trees"`
	FrozenAt time.Time                 `json:"frozenAt"`
}

type frozenTreeRecord struct {
	PID   int    `json:"pid"`
	Start uint64 `json:"start"`
}

// stateDir is the node's directory of frozen records ("" when the agent keeps none).
func (a *Agent) stateDir() string {
	if a.cfg.StateDir == "" {
		return ""
	}
	return filepath.Join(a.cfg.StateDir, a.cfg.NodeName)
}

func (a *Agent) recordPath(uid string) string {
	return filepath.Join(a.stateDir(), "frozen-"+uid+".json")
}

// recordFrozen writes the operation's record, atomically (a torn record would be unreadable).
func (a *Agent) recordFrozen(op *operation, frozenAt time.Time) {
	if a.stateDir() == "" {
		return
	}
	op.mu.Lock()
	rec := frozenRecord{Status: op.status, FrozenAt: frozenAt}
	rec.Status.Containers = append([]agentapi.ContainerResult(nil), op.status.Containers...)
	rec.Status.BytesWritten = op.bytes.Load()
	for _, t := range op.frozen {
		rec.Trees = append(rec.Trees, frozenTreeRecord{PID: t.pid, Start: t.start})
	}
	op.mu.Unlock()
	if err := writeRecord(a.stateDir(), a.recordPath(rec.Status.Pod.UID), rec); err != nil {
		// The app is frozen all the same; only an agent restart would leave it to its launcher.
		a.cfg.Log.Error().Err(err).Str("uid", rec.Status.Pod.UID).Msg("recording the frozen app on the node")
	}
}

func writeRecord(dir, p string, rec frozenRecord) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, p)
}

// forgetFrozen removes the operation's record once its apps are thawed or gone.
func (a *Agent) forgetFrozen(uid string) {
	if a.stateDir() == "" || uid == "" {
		return
	}
	if err := os.Remove(a.recordPath(uid)); err != nil && !os.IsNotExist(err) {
		a.cfg.Log.Warn().Err(err).Str("uid", uid).Msg("removing the frozen app's record")
	}
}

// adoptFrozen takes over the operations a previous agent on this node left frozen.
func (a *Agent) adoptFrozen() error {
	dir := a.stateDir()
	if dir == "" {
		return nil
	}
	paths, err := filepath.Glob(filepath.Join(dir, "frozen-*.json"))
	if err != nil {
		return err
	}
	for _, p := range paths {
		b, err := os.ReadFile(p)
		var rec frozenRecord
		if err == nil {
			err = json.Unmarshal(b, &rec)
		}
		if err != nil || rec.Status.Pod.UID == "" {
			a.cfg.Log.Warn().Err(err).Str("record", p).Msg("unreadable frozen record: removed")
			_ = os.Remove(p)
			continue
		}
		a.adopt(rec)
	}
	return nil
}

// adopt re-creates a finished operation from its record, with the trees still frozen.
func (a *Agent) adopt(rec frozenRecord) {
	uid := rec.Status.Pod.UID
	var trees []frozenTree
	for _, t := range rec.Trees {
		if st, err := criurun.StartTime(t.PID); err == nil && st == t.Start {
			trees = append(trees, frozenTree{pid: t.PID, start: t.Start})
		}
	}
	if len(trees) == 0 {
		a.forgetFrozen(uid) // the pod was deleted meanwhile and its launcher ended the app
		return
	}
	op := &operation{cancel: func() {}, done: make(chan struct{}), status: rec.Status, frozen: trees}
	op.bytes.Store(rec.Status.BytesWritten)
	close(op.done)
	a.mu.Lock()
	a.ops[uid] = op
	a.mu.Unlock()
	a.cfg.Log.Info().Str("uid", uid).Str("pod", rec.Status.Pod.Namespace+"/"+rec.Status.Pod.Name).
		Int("trees", len(trees)).Msg(fmt.Sprintf("adopted an app frozen by a previous agent since %s", rec.FrozenAt.Format(time.RFC3339)))
	a.holdFrozenSince(op, rec.Status.Pod, rec.FrozenAt)
}
