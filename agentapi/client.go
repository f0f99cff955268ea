package agentapi

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Client talks to the agents of a cluster. It is safe for concurrent use.
type Client struct {
	HTTP *http.Client
}

// NewClient returns a client that presents the given TLS configuration (client certificate and the
// agents' CA) to every agent.
func NewClient(tlsConfig *tls.Config, timeout time.Duration) *Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = tlsConfig
	return &Client{HTTP: &http.Client{Transport: tr, Timeout: timeout}}
}

// StatusError is an answer other than 2xx from an agent.
type StatusError struct {
	Code    int
	Message string
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("agent answered %d: %s", e.Code, e.Message)
}

// IsNotFound reports whether err is the agent's 404 for an unknown operation.
func IsNotFound(err error) bool {
	var se *StatusError
	return errors.As(err, &se) && se.Code == http.StatusNotFound
}

// IsForbidden reports an agent's 403: the caller may not ask this (another pod's data, or the
// caller is not a pod's container); retrying cannot help.
func IsForbidden(err error) bool {
	var se *StatusError
	return errors.As(err, &se) && se.Code == http.StatusForbidden
}

// Checkpoint starts a checkpoint on the agent at base (e.g. "https://10.0.0.5:9443") or joins the
// one in flight for the same pod UID.
func (c *Client) Checkpoint(ctx context.Context, base string, req CheckpointRequest) (CheckpointStatus, error) {
	var st CheckpointStatus
	err := c.do(ctx, http.MethodPost, base+PathCheckpoints, req, &st)
	return st, err
}

// Status returns the state of the operation for a pod UID.
func (c *Client) Status(ctx context.Context, base, uid string) (CheckpointStatus, error) {
	var st CheckpointStatus
	err := c.do(ctx, http.MethodGet, base+PathCheckpoints+"/"+url.PathEscape(uid), nil, &st)
	return st, err
}

// List returns every operation the agent knows.
func (c *Client) List(ctx context.Context, base string) (CheckpointList, error) {
	var l CheckpointList
	err := c.do(ctx, http.MethodGet, base+PathCheckpoints, nil, &l)
	return l, err
}

// Delete forgets the operation for a pod UID and thaws the pod if it is still frozen.
func (c *Client) Delete(ctx context.Context, base, uid string) error {
	return c.do(ctx, http.MethodDelete, base+PathCheckpoints+"/"+url.PathEscape(uid), nil, nil)
}

func (c *Client) do(ctx context.Context, method, u string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		var e Error
		if json.Unmarshal(data, &e) != nil || e.Message == "" {
			e.Message = strings.TrimSpace(string(data))
		}
		return &StatusError{Code: resp.StatusCode, Message: e.Message}
	}
	if out == nil || len(data) == 0 {
		return nil
	}
	return json.Unmarshal(data, out)
}
