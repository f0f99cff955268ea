// Package agentapi is the contract between the webhook (client) and the node agent (server): the
// HTTP paths, the request and status types, and a client. Both sides import it; nothing else about
// the agent's API is defined anywhere else.
//
// The API is versioned by path (/v1/...). Checkpoint operations are keyed by pod UID: starting a
// checkpoint for a UID that already has one in flight (or finished) joins it instead of starting
// another, so a retried eviction, possibly on another webhook replica, never causes a second dump.
package agentapi

import (
	"fmt"
	"time"
)

const (
	// PathCheckpoints is the collection of checkpoint operations on one node.
	// POST   /v1/checkpoints         start or join a checkpoint (body CheckpointRequest) → CheckpointStatus
	// GET    /v1/checkpoints         list the operations this agent knows → CheckpointList
	// GET    /v1/checkpoints/{uid}   one operation's status → CheckpointStatus (404 when unknown)
	// DELETE /v1/checkpoints/{uid}   forget the operation; a pod still frozen by it is thawed
	PathCheckpoints = "/v1/checkpoints"

	// DefaultPort is the agent's mTLS API port.
	DefaultPort = 9443

	// WebhookIdentity is the client-certificate identity (CN or DNS SAN) the agent accepts for
	// starting dumps. Every other caller gets 403; callers without a client certificate get 401.
	WebhookIdentity = "stasis-webhook"

	// ServerName is the name every agent's serving certificate carries (agents are reached by pod
	// or node IP, so the webhook verifies this fixed name instead of the address).
	ServerName = "stasis-agent"
)

// Phase is where a checkpoint operation is.
type Phase string

const (
	PhasePending   Phase = "Pending"   // accepted, waiting for a dump slot on the node
	PhaseRunning   Phase = "Running"   // CRIU is writing images
	PhaseSucceeded Phase = "Succeeded" // every requested container has a complete checkpoint
	PhaseFailed    Phase = "Failed"    // at least one container failed; no partial checkpoint was kept as complete
)

// Done reports whether the phase is final.
func (p Phase) Done() bool { return p == PhaseSucceeded || p == PhaseFailed }

// PodRef names the pod a checkpoint is taken of. UID is the key of the operation.
type PodRef struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	UID       string `json:"uid"`
}

// CheckpointRequest asks the agent on the pod's node to checkpoint some of its containers.
type CheckpointRequest struct {
	Pod        PodRef          `json:"pod"`
	Containers []ContainerSpec `json:"containers"`
	// Reason is shown in logs and Events: "eviction" or "job-suspend".
	Reason string `json:"reason,omitempty"`
	// Diagnosis keeps CRIU logs and the images of failed dumps (checkpoint-diagnosis label).
	Diagnosis bool `json:"diagnosis,omitempty"`
	// Keep is how many complete checkpoints per container to keep besides the new one
	// (webhook --keep-checkpoints); 0 leaves the agent's own default.
	Keep int `json:"keep,omitempty"`
	// Interval, in the pod's checkpoint annotation only, asks the agent for periodic checkpoints
	// (checkpoint-interval, a Go duration): the app is left running after each.
	Interval string `json:"interval,omitempty"`
	// LeaveRunning dumps without stopping the app afterwards (the agent's periodic checkpoints).
	LeaveRunning bool `json:"leaveRunning,omitempty"`
	// Owner is the UID of the pod's controller (a Job, a StatefulSet, a Deployment's ReplicaSet):
	// a checkpoint restores only into pods of the same one, never into a Job re-created under the
	// same name or a new rollout. Empty for plain pods.
	Owner string `json:"owner,omitempty"`
}

// ContainerSpec is one container to checkpoint.
type ContainerSpec struct {
	Name string `json:"name"`
	// Dir is the container's checkpoint directory as seen inside the container
	// (wiring.CheckpointDir(identity, container)); checkpoints are created below it.
	Dir string `json:"dir"`
	// Files are absolute paths in the container's filesystem copied into the checkpoint and put back
	// before restore (checkpoint-files / MMC_CHECKPOINT_FILES).
	Files []string `json:"files,omitempty"`
	// CriuOptions are extra CRIU dump options (checkpoint-advanced-options /
	// MMC_CHECKPOINT_ADVANCED_OPTIONS), already validated by the webhook, e.g. "--tcp-established".
	CriuOptions []string `json:"criuOptions,omitempty"`
	// Rootfs: carry every change of the container's writable layer, not only the files its
	// processes hold (checkpoint-rootfs).
	Rootfs bool `json:"rootfs,omitempty"`
}

// CheckpointStatus is the state of one checkpoint operation.
type CheckpointStatus struct {
	Pod   PodRef `json:"pod"`
	Node  string `json:"node"`
	Phase Phase  `json:"phase"`
	// Message says what failed (CRIU's log tail quoted) or what is going on.
	Message string `json:"message,omitempty"`
	// BytesWritten is the progress: image bytes written so far, all containers.
	BytesWritten int64 `json:"bytesWritten"`
	// ExpectedBytes is, while Running, the agent's estimate of what the dump will have written
	// (the apps' anonymous memory); 0 when unknown.
	ExpectedBytes int64 `json:"expectedBytes,omitempty"`
	// Ahead is, while Pending, how many dumps on the node come before this one (running, then
	// waiting): the node runs only as many at once as its disk absorbs.
	Ahead      int               `json:"ahead,omitempty"`
	StartedAt  time.Time         `json:"startedAt"`
	FinishedAt *time.Time        `json:"finishedAt,omitempty"`
	Containers []ContainerResult `json:"containers,omitempty"`
}

// ContainerResult is the outcome for one container.
type ContainerResult struct {
	Name  string `json:"name"`
	Phase Phase  `json:"phase"`
	// CheckpointID names the checkpoint directory below ContainerSpec.Dir; set once complete. All
	// containers of one operation get the same ID (the pod restores from one restore ID).
	CheckpointID string `json:"checkpointID,omitempty"`
	// Generation is the checkpoint's place among the container's checkpoints on the volume
	// (checkpoint.Manifest.Generation): the webhook orders its records by it, not by clocks.
	Generation uint64 `json:"generation,omitempty"`
	// Bytes is what the checkpoint occupies on the volume (its files and the stored chunks it
	// references); ImageBytes is CRIU's images before compression and deduplication.
	Bytes      int64  `json:"bytes"`
	ImageBytes int64  `json:"imageBytes,omitempty"`
	Message    string `json:"message,omitempty"`
}

// CheckpointList is the answer to GET /v1/checkpoints.
type CheckpointList struct {
	Items []CheckpointStatus `json:"items"`
}

// Error is the JSON body of every non-2xx answer.
type Error struct {
	Message string `json:"message"`
}

// HumanBytes formats a byte count as the agent's and the webhook's messages show it ("1.2 GiB").
func HumanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
