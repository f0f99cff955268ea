package fakeagent_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/tests/cluster"
	"github.com/stasis-k8s/stasis/tests/fakeagent"
)

func setup(t *testing.T) (*fakeagent.Agent, *cluster.CA) {
	t.Helper()
	ca, err := cluster.NewCA("fakeagent-test")
	require.NoError(t, err)
	cert, key, err := ca.Sign(cluster.CertRequest{CommonName: agentapi.ServerName, DNSNames: []string{agentapi.ServerName}, Server: true})
	require.NoError(t, err)
	a, err := fakeagent.Start(fakeagent.Config{ServerCertPEM: cert, ServerKeyPEM: key, ClientCAPEM: ca.CertPEM, Node: "node-a",
		Default: fakeagent.Script{Duration: 50 * time.Millisecond, Bytes: 100}})
	require.NoError(t, err)
	t.Cleanup(func() { a.Close() })
	return a, ca
}

func client(t *testing.T, ca *cluster.CA, identity string) *agentapi.Client {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca.CertPEM)
	cfg := &tls.Config{RootCAs: pool, ServerName: agentapi.ServerName}
	if identity != "" {
		c, k, err := ca.Sign(cluster.CertRequest{CommonName: identity, Client: true})
		require.NoError(t, err)
		pair, err := tls.X509KeyPair(c, k)
		require.NoError(t, err)
		cfg.Certificates = []tls.Certificate{pair}
	}
	return agentapi.NewClient(cfg, 5*time.Second)
}

func req(name, uid string) agentapi.CheckpointRequest {
	return agentapi.CheckpointRequest{
		Pod:        agentapi.PodRef{Namespace: "ns", Name: name, UID: uid},
		Containers: []agentapi.ContainerSpec{{Name: "app", Dir: "/stasis/checkpoints/x/app"}},
		Reason:     "eviction",
	}
}

func waitDone(t *testing.T, c *agentapi.Client, base, uid string) agentapi.CheckpointStatus {
	t.Helper()
	for {
		st, err := c.Status(context.Background(), base, uid)
		require.NoError(t, err)
		if st.Phase.Done() {
			return st
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestFakeAgentScriptedDumps(t *testing.T) {
	a, ca := setup(t)
	a.SetScript("ns", "broken", fakeagent.Script{Duration: 10 * time.Millisecond, Fail: "criu dump: Permission denied"})
	c := client(t, ca, agentapi.WebhookIdentity)
	ctx := context.Background()

	st, err := c.Checkpoint(ctx, a.URL(), req("good", "u1"))
	require.NoError(t, err)
	assert.Equal(t, "node-a", st.Node)
	st = waitDone(t, c, a.URL(), "u1")
	assert.Equal(t, agentapi.PhaseSucceeded, st.Phase)
	assert.EqualValues(t, 100, st.BytesWritten)
	require.Len(t, st.Containers, 1)
	assert.NotEmpty(t, st.Containers[0].CheckpointID)

	// Joining a finished operation answers its status and starts nothing.
	again, err := c.Checkpoint(ctx, a.URL(), req("good", "u1"))
	require.NoError(t, err)
	assert.Equal(t, agentapi.PhaseSucceeded, again.Phase)
	assert.Equal(t, 1, a.DumpsOf("ns", "good"))
	assert.Equal(t, 2, a.Posts())

	_, err = c.Checkpoint(ctx, a.URL(), req("broken", "u2"))
	require.NoError(t, err)
	st = waitDone(t, c, a.URL(), "u2")
	assert.Equal(t, agentapi.PhaseFailed, st.Phase)
	assert.Equal(t, "criu dump: Permission denied", st.Message)
	assert.Empty(t, st.Containers[0].CheckpointID, "a failed dump names no checkpoint")

	l, err := c.List(ctx, a.URL())
	require.NoError(t, err)
	assert.Len(t, l.Items, 2)

	require.NoError(t, c.Delete(ctx, a.URL(), "u1"))
	_, err = c.Status(ctx, a.URL(), "u1")
	assert.True(t, agentapi.IsNotFound(err), "status after delete: %v", err)
}

func TestFakeAgentRefusesOtherClients(t *testing.T) {
	a, ca := setup(t)
	ctx := context.Background()
	var se *agentapi.StatusError

	_, err := client(t, ca, "").Checkpoint(ctx, a.URL(), req("p", "u"))
	require.True(t, errors.As(err, &se), "no client certificate: %v", err)
	assert.Equal(t, http.StatusUnauthorized, se.Code)

	_, err = client(t, ca, "someone-else").Checkpoint(ctx, a.URL(), req("p", "u"))
	require.True(t, errors.As(err, &se), "wrong identity: %v", err)
	assert.Equal(t, http.StatusForbidden, se.Code)

	_, err = client(t, ca, agentapi.WebhookIdentity).Checkpoint(ctx, a.URL(), agentapi.CheckpointRequest{})
	require.True(t, errors.As(err, &se), "empty request: %v", err)
	assert.Equal(t, http.StatusBadRequest, se.Code)
	assert.Contains(t, se.Message, "pod.uid is empty")

	assert.Equal(t, 2, a.Denied())
	assert.Empty(t, a.Dumps())
}

// The unit-test mode: a plain handler (no TLS) whose dumps end after a number of status polls,
// never on their own (Polls < 0) until Finish, so that webhook tests need no clock.
func TestFakeAgentPolledDumps(t *testing.T) {
	a := fakeagent.New("node-1")
	a.SetScript("ns", "slow", fakeagent.Script{Polls: 2, Bytes: 10})
	a.SetScript("ns", "stuck", fakeagent.Script{Polls: -1, Bytes: 20})
	srv := httptest.NewServer(a)
	t.Cleanup(srv.Close)
	c := agentapi.NewClient(nil, 5*time.Second)
	ctx := context.Background()

	st, err := c.Checkpoint(ctx, srv.URL, req("slow", "u1"))
	require.NoError(t, err)
	assert.Equal(t, agentapi.PhaseRunning, st.Phase)
	assert.EqualValues(t, 10, st.BytesWritten)
	st, err = c.Status(ctx, srv.URL, "u1")
	require.NoError(t, err)
	assert.Equal(t, agentapi.PhaseRunning, st.Phase, "first poll")
	st, err = c.Status(ctx, srv.URL, "u1")
	require.NoError(t, err)
	assert.Equal(t, agentapi.PhaseSucceeded, st.Phase, "second poll")
	require.Len(t, st.Containers, 1)
	assert.Equal(t, "ckpt-1", st.Containers[0].CheckpointID)

	_, err = c.Checkpoint(ctx, srv.URL, req("stuck", "u2"))
	require.NoError(t, err)
	_, err = c.Checkpoint(ctx, srv.URL, req("stuck", "u2"))
	require.NoError(t, err)
	st, err = c.Status(ctx, srv.URL, "u2")
	require.NoError(t, err)
	assert.Equal(t, agentapi.PhaseRunning, st.Phase)
	a.Finish("u2")
	st, ok := a.Op("u2")
	require.True(t, ok)
	assert.Equal(t, agentapi.PhaseSucceeded, st.Phase)
	assert.Equal(t, "ckpt-2", st.Containers[0].CheckpointID)
	assert.Equal(t, 2, a.PostsFor("u2"))
	assert.Equal(t, 3, a.Posts())
	assert.Len(t, a.Requests(), 3)

	require.NoError(t, c.Delete(ctx, srv.URL, "u2"))
	assert.Equal(t, []string{"u2"}, a.Deleted())
}
