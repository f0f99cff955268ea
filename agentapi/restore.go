package agentapi

import (
	"context"
	"net/http"
)

// LocalPathRestore: POST RestoreRequest → RestoreResponse, answered once the restore is done (or
// refused). Only the container's PID 1 may ask, for its own container: the agent checks the
// caller's PID (SO_PEERCRED) against the container the runtime runs.
const LocalPathRestore = "/v1/restore"

// RestoreRequest is a launcher asking the agent to restore its container's checkpoint into it.
type RestoreRequest struct {
	Pod       PodRef `json:"pod"`
	Container string `json:"container"`
	// CheckpointID is the checkpoint the pod was created to restore (the agent checks it against
	// the pod's restore annotation, which only the webhook writes).
	CheckpointID string `json:"checkpointID"`
	// Options are the user's extra CRIU restore options (restore-advanced-options); the agent
	// checks them against the allowed list again.
	Options []string `json:"options,omitempty"`
}

// RestoreResponse says how it went. Restored: the app runs again as a child of the caller, PID
// as seen in the container; else the caller starts the app afresh and Message says why.
type RestoreResponse struct {
	Restored     bool   `json:"restored"`
	PID          int    `json:"pid,omitempty"`
	CheckpointID string `json:"checkpointID,omitempty"`
	Message      string `json:"message,omitempty"`
}

// Restore asks the agent to restore the caller's container; it blocks until the restore is done.
func (c *Client) Restore(ctx context.Context, base string, req RestoreRequest) (RestoreResponse, error) {
	var r RestoreResponse
	err := c.do(ctx, http.MethodPost, base+LocalPathRestore, req, &r)
	return r, err
}

// LocalPathRestoreOutcome: GET → RestoreOutcome of the caller's restore. The launcher asks when
// the tree the agent restored for it was killed (SIGKILL) without a SIGTERM: if the agent killed
// it because its lazy restore failed after the resume, the launcher starts the app afresh in the
// same container instead of exiting (a Job would count the exit as a failure).
const LocalPathRestoreOutcome = "/v1/restore-outcome"

// RestoreOutcome says whether the agent killed the caller's restored tree, and why.
type RestoreOutcome struct {
	Killed       bool   `json:"killed"`
	CheckpointID string `json:"checkpointID,omitempty"`
	Message      string `json:"message,omitempty"`
}

// RestoreOutcome asks the agent what became of the caller's restore.
func (c *Client) RestoreOutcome(ctx context.Context, base string) (RestoreOutcome, error) {
	var o RestoreOutcome
	err := c.do(ctx, http.MethodGet, base+LocalPathRestoreOutcome, nil, &o)
	return o, err
}
