package agentapi

import (
	"context"
	"net"
	"net/http"
	"net/url"
	"time"
)

// The agent's local channel: plain HTTP on the unix socket wiring.HostAgentDir/wiring.AgentSocketName,
// reachable only from the node (launchers see it through the read-only hostPath volume
// wiring.AgentVolume). The agent identifies each caller from the kernel (peer credentials → cgroup
// → pod and container, checked with the container runtime) and answers about the caller's own
// pod and container only: 403 for a request naming another, 429 when the pod has too many
// requests in progress.
const (
	// LocalPathEntrypoint: GET → Entrypoint of the caller's own container (the image's config, read
	// by the agent through the container runtime). podUID= and container=, when given, must name the
	// caller (403 otherwise); image= is ignored.
	LocalPathEntrypoint = "/v1/entrypoint"
	// LocalPathRestoreResults: POST RestoreResult → 204. The agent logs it, counts it and records
	// an Event on the caller's pod. Pod fields and Container, when set, must name the caller (403
	// otherwise); empty ones are filled in by the agent.
	LocalPathRestoreResults = "/v1/restore-results"
	// LocalBase is the base URL used on the unix socket (the host part is ignored).
	LocalBase = "http://stasis-agent.local"
)

// Entrypoint is the image configuration the launcher needs when the pod sets no command.
type Entrypoint struct {
	Entrypoint []string `json:"entrypoint,omitempty"`
	Cmd        []string `json:"cmd,omitempty"`
	WorkingDir string   `json:"workingDir,omitempty"`
	// Image is the image the runtime resolved (name or digest).
	Image string `json:"image,omitempty"`
}

// RestoreResult is what a launcher reports after deciding between restore and cold start.
type RestoreResult struct {
	Pod          PodRef `json:"pod"`
	Container    string `json:"container"`
	CheckpointID string `json:"checkpointID,omitempty"`
	// Restored is true when CRIU restored the checkpoint; false means a cold start.
	Restored bool   `json:"restored"`
	Message  string `json:"message,omitempty"`
}

// NewLocalClient returns a client for the agent's unix socket; use LocalBase as base.
func NewLocalClient(socket string, timeout time.Duration) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}
	return &Client{HTTP: &http.Client{Transport: tr, Timeout: timeout}}
}

// Entrypoint asks the agent for the image configuration of a pod's container.
func (c *Client) Entrypoint(ctx context.Context, base, podUID, container, image string) (Entrypoint, error) {
	var e Entrypoint
	q := url.Values{"podUID": {podUID}, "container": {container}, "image": {image}}
	err := c.do(ctx, http.MethodGet, base+LocalPathEntrypoint+"?"+q.Encode(), nil, &e)
	return e, err
}

// ReportRestore tells the agent how a restore went.
func (c *Client) ReportRestore(ctx context.Context, base string, r RestoreResult) error {
	return c.do(ctx, http.MethodPost, base+LocalPathRestoreResults, r, nil)
}
