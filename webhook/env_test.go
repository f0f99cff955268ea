package webhook

// Test environment. Unit tests here use client-go's FAKE clientset (k8s.io/client-go/kubernetes/fake)
// for the API server and listers over plain indexers for the informer caches; the agent is
// fakeagent (a FAKE speaking the real agent API over HTTP). The real API server is exercised by
// the integration tier (tests/integration), which runs `stasis webhook` itself.

import (
	"bytes"
	"context"
	"io"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	klabels "k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	corev1listers "k8s.io/client-go/listers/core/v1"
	policyv1listers "k8s.io/client-go/listers/policy/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/tests/fakeagent"
)

type testEnv struct {
	t      testing.TB
	client *fake.Clientset
	pods   cache.Indexer
	pdbs   cache.Indexer
	agent  *fakeagent.Agent
	events []string // recorded so far, filled by drainEvents
	rec    *record.FakeRecorder
	srv    *httptest.Server
	wh     *Webhook
	reg    *prometheus.Registry
}

type envOption func(*Config, *Deps)

func newEnv(t testing.TB, cfg Config, objs []runtime.Object, opts ...envOption) *testEnv {
	t.Helper()
	e := &testEnv{t: t, client: fake.NewClientset(objs...), agent: fakeagent.New("node-1"),
		rec: record.NewFakeRecorder(1000), reg: prometheus.NewRegistry()}
	e.pods = cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	e.pdbs = cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	agentSrv := httptest.NewServer(e.agent)
	t.Cleanup(agentSrv.Close)
	agents := agentapi.NewClient(nil, 5*time.Second)
	if cfg.ToolsImage == "" {
		cfg.ToolsImage = "stasis-agent:dev"
	}
	if cfg.PollInterval == 0 {
		cfg.PollInterval = time.Millisecond
	}
	d := Deps{
		Client: e.client, Pods: corev1listers.NewPodLister(e.pods), PDBs: policyv1listers.NewPodDisruptionBudgetLister(e.pdbs),
		Agents: agents, Locate: StaticLocator(agentSrv.URL), Events: e.rec, Registry: e.reg, Log: zerolog.Nop(),
		Now: func() time.Time { return time.Date(2026, 11, 29, 10, 0, 0, 0, time.UTC) },
	}
	for _, o := range opts {
		o(&cfg, &d)
	}
	wh, err := New(cfg, d)
	require.NoError(t, err)
	h, err := wh.Handler()
	require.NoError(t, err)
	e.wh = wh
	// The real handler behind a real TLS server: what the API server talks to.
	e.srv = httptest.NewTLSServer(h)
	t.Cleanup(e.srv.Close)
	return e
}

func (e *testEnv) addPods(pods ...*corev1.Pod) {
	for _, p := range pods {
		require.NoError(e.t, e.pods.Add(p))
	}
}

func fixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	require.NoError(t, err)
	return b
}

// post sends body to path and returns the HTTP status and the body.
func (e *testEnv) post(path string, body []byte) (int, string) {
	e.t.Helper()
	resp, err := e.srv.Client().Post(e.srv.URL+path, "application/json", bytes.NewReader(body))
	require.NoError(e.t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(e.t, err)
	return resp.StatusCode, string(b)
}

// drainEvents returns the Events recorded so far ("Type Reason message") and keeps them in e.events.
func (e *testEnv) drainEvents() []string {
	for {
		select {
		case ev := <-e.rec.Events:
			e.events = append(e.events, ev)
		default:
			return e.events
		}
	}
}

// syncPVCs plays the pod's creation for the PVC controller: the pod (named, as the API server
// names it) enters the informer cache and the controller syncs it, as the real one does on the
// informer's add event.
func (e *testEnv) syncPVCs(pod *corev1.Pod) {
	e.t.Helper()
	p := pod.DeepCopy()
	if p.Name == "" {
		p.Name = p.GenerateName + "x1y2z"
	}
	p.Namespace = "default"
	require.NoError(e.t, e.pods.Add(p))
	managed := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	l, err := e.client.CoreV1().PersistentVolumeClaims("").List(context.Background(), metav1.ListOptions{})
	require.NoError(e.t, err)
	for i := range l.Items {
		require.NoError(e.t, managed.Add(&l.Items[i]))
	}
	c := NewPVCController(e.wh, corev1listers.NewPersistentVolumeClaimLister(managed))
	require.NoError(e.t, c.Sync(context.Background(), "default/"+p.Name))
}

func containsEvent(events []string, substr string) bool {
	for _, e := range events {
		if strings.Contains(e, substr) {
			return true
		}
	}
	return false
}

func mustSelector(s string) klabels.Selector {
	sel, err := klabels.Parse(s)
	if err != nil {
		panic(err)
	}
	return sel
}

func readFixture(name string) ([]byte, error) { return os.ReadFile(filepath.Join("testdata", name)) }
