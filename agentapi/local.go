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
