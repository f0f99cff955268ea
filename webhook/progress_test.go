package webhook

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/stasis-k8s/stasis/agentapi"
)

// statusAgent answers every start and poll with one status (an agent whose node is busy).
type statusAgent struct {
	AgentClient
	st agentapi.CheckpointStatus
}

func (a statusAgent) Checkpoint(context.Context, string, agentapi.CheckpointRequest) (agentapi.CheckpointStatus, error) {
	return a.st, nil
}

func (a statusAgent) Status(context.Context, string, string) (agentapi.CheckpointStatus, error) {
	return a.st, nil
}

// An eviction whose dump waits behind others on the node is told its place; a running one its
// bytes against the agent's estimate. kubectl drain prints the message at every retry.
func TestEvictionTooManyRequestsSaysQueuePlaceAndProgress(t *testing.T) {
	for _, tc := range []struct {
		name string
		st   agentapi.CheckpointStatus
		want string
	}{
		{"queued", agentapi.CheckpointStatus{Phase: agentapi.PhasePending, Node: "node-1", Ahead: 3},
			"checkpoint of pod default/app in progress: queued: 3 dump(s) ahead on node node-1, retry"},
		{"dumping", agentapi.CheckpointStatus{Phase: agentapi.PhaseRunning, Node: "node-1", BytesWritten: 120 << 20, ExpectedBytes: 256 << 20},
			"checkpoint of pod default/app in progress: dumping: 120.0 MiB of ~256.0 MiB, retry"},
		{"no estimate", agentapi.CheckpointStatus{Phase: agentapi.PhaseRunning, Node: "node-1", BytesWritten: 2048},
			"checkpoint of pod default/app in progress: 2.0 KiB written, retry"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, Config{WaitBudget: 50e6}, []runtime.Object{userPVC("ckpt-pvc")}, func(_ *Config, d *Deps) { d.Agents = statusAgent{st: tc.st} })
			e.addPods(runningPod())
			_, body := e.post(PathEviction, fixture(t, "eviction-v1.json"))
			assert.JSONEq(t, v1Response(evUID, `"allowed":false,"status":{"metadata":{},"status":"Failure","reason":"TooManyRequests","code":429,`+
				`"message":"`+tc.want+`"}`), body)
		})
	}
}
