package webhook

import (
	"fmt"

	"github.com/stasis-k8s/stasis/agentapi"
)

// progressOf says where one pod's checkpoint is, for the 429 the evicting client prints (kubectl
// drain shows it at each retry): its place in the node's queue while the agent holds it back
// (the node runs only as many dumps at once as it absorbs), then the bytes written against the
// agent's estimate.
func progressOf(st agentapi.CheckpointStatus) string {
	switch {
	case st.Phase == agentapi.PhasePending && st.Ahead > 0:
		return fmt.Sprintf("queued: %d dump(s) ahead on node %s", st.Ahead, st.Node)
	case st.ExpectedBytes > 0:
		return fmt.Sprintf("dumping: %s of ~%s", agentapi.HumanBytes(st.BytesWritten), agentapi.HumanBytes(st.ExpectedBytes))
	default:
		return agentapi.HumanBytes(st.BytesWritten) + " written"
	}
}
