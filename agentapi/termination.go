package agentapi

import (
	"context"
	"net/http"
)

// LocalPathCheckpoint: POST (empty body) → CheckpointStatus, answered once the pod's checkpoint
// is complete or failed. The launcher asks when it receives SIGTERM and its app is running: a
// graceful termination no admission webhook saw (kubectl delete, preemption, scale-down, kubelet
// pressure eviction, node shutdown). Only a container's PID 1 may ask, for its own pod; what is
// dumped is what the webhook wrote into the pod at creation (wiring.AnnotationCheckpoint).
const LocalPathCheckpoint = "/v1/checkpoint"

// CheckpointOnTermination asks the agent to checkpoint the caller's pod and waits for the result (bounded by
// ctx: the launcher passes what is left of the pod's grace period).
func (c *Client) CheckpointOnTermination(ctx context.Context, base string) (CheckpointStatus, error) {
	var st CheckpointStatus
	err := c.do(ctx, http.MethodPost, base+LocalPathCheckpoint, struct{}{}, &st)
	return st, err
}

// LocalPathConsumed: POST (empty body) → 204 once the caller's container's checkpoints are
// removed. The launcher asks when its app exited 0 by itself: finished work is not continued.
const LocalPathConsumed = "/v1/consumed"

// Consumed tells the agent that the caller's app finished its work.
func (c *Client) Consumed(ctx context.Context, base string) error {
	return c.do(ctx, http.MethodPost, base+LocalPathConsumed, struct{}{}, nil)
}
