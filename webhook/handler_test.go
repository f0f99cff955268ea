package webhook

import (
	"encoding/json"
	"net/http"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	admissionv1 "k8s.io/api/admission/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	appsv1listers "k8s.io/client-go/listers/apps/v1"
	corev1listers "k8s.io/client-go/listers/core/v1"
	clienttesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"
)

// rsPod is the review of a pod owned by ReplicaSet web-rs (identity from the owner: a read).
func rsPod(t *testing.T, dryRun bool) []byte {
	p := reviewObject[corev1.Pod](t, fixture(t, "pod-create-job-command.json"))
	p.OwnerReferences = []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "ReplicaSet", Name: "web-rs", UID: "rs-uid", Controller: ptr.To(true)}}
	return podReview(t, p, dryRun)
}

var webRS = &appsv1.ReplicaSet{ObjectMeta: metav1.ObjectMeta{Name: "web-rs", Namespace: "default", UID: "rs-uid"},
	Spec: appsv1.ReplicaSetSpec{Replicas: ptr.To[int32](1)}}

// blockAPI makes every API call of the fake client wait until release is closed (an API server
// that stopped answering, or a rate limiter out of tokens). The fake client holds its lock during
// a call, so later calls queue behind the first.
func blockAPI(e *testEnv) (release func()) {
	gate := make(chan struct{})
	e.client.PrependReactor("*", "*", func(clienttesting.Action) (bool, runtime.Object, error) {
		<-gate
		return false, nil, nil
	})
	var once sync.Once
	release = func() { once.Do(func() { close(gate) }) }
	e.t.Cleanup(release)
	return release
}

func decodeResponse(t *testing.T, body string) *admissionv1.AdmissionResponse {
	var out admissionv1.AdmissionReview
	require.NoError(t, json.Unmarshal([]byte(body), &out))
	require.NotNil(t, out.Response)
	return out.Response
}

// A decision that cannot finish (the API does not answer) is answered 429 with Retry-After at
// its deadline (timeout minus margin), before the API server's timeout, never by a hang.
func TestReviewPastDeadlineAnswers429BeforeTimeout(t *testing.T) {
	e := newEnv(t, Config{PodTimeout: 1500 * time.Millisecond, DeadlineMargin: time.Second}, []runtime.Object{webRS})
	// Every API call takes 2 s (an API server that stopped answering in time).
	e.client.PrependReactor("*", "*", func(clienttesting.Action) (bool, runtime.Object, error) {
		time.Sleep(2 * time.Second)
		return false, nil, nil
	})
	t0 := time.Now()
	code, body := e.post(PathMutatePod, rsPod(t, false))
	took := time.Since(t0)
	require.Equal(t, http.StatusOK, code, body)
	r := decodeResponse(t, body)
	assert.False(t, r.Allowed)
	assert.EqualValues(t, http.StatusTooManyRequests, r.Result.Code)
	assert.Equal(t, metav1.StatusReasonTooManyRequests, r.Result.Reason)
	require.NotNil(t, r.Result.Details)
	assert.EqualValues(t, 1, r.Result.Details.RetryAfterSeconds)
	assert.Contains(t, r.Result.Message, "review not decided within its deadline (500ms); retry")
	assert.Less(t, took, 1500*time.Millisecond, "answered before the configuration's timeout")
	assert.GreaterOrEqual(t, took, 500*time.Millisecond, "the decision had its whole deadline")

	// The API server's own ?timeout= (shorter than the setting) wins.
	t0 = time.Now()
	code, body = e.post(PathMutatePod+"?timeout=1200ms", rsPod(t, false))
	require.Equal(t, http.StatusOK, code, body)
	assert.Contains(t, decodeResponse(t, body).Result.Message, "within its deadline (200ms)")
	assert.Less(t, time.Since(t0), time.Second)
	assert.Equal(t, 2, int(testutilCounter(t, e, "stasis_webhook_reviews_shed_total", `reason="deadline",webhook="pod"`)))
}

// Beyond --max-pod-reviews in flight a pod review is shed at once (429, Retry-After), never
// queued; the eviction path has its own bulkhead and is decided meanwhile.
func TestPodFloodIsShedAndEvictionsStillDecided(t *testing.T) {
	e := newEnv(t, Config{MaxPodReviews: 2, RetryAfter: 3 * time.Second}, []runtime.Object{webRS})
	release := blockAPI(e)
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() { defer wg.Done(); e.post(PathMutatePod, rsPod(t, false)) }()
	}
	// Both reviews hold a slot, waiting for the API.
	require.Eventually(t, func() bool { return gauge(t, e, "stasis_webhook_reviews_in_flight", `webhook="pod"`) == 2 },
		5*time.Second, 5*time.Millisecond)
	t0 := time.Now()
	code, body := e.post(PathMutatePod, rsPod(t, false))
	require.Equal(t, http.StatusOK, code, body)
	r := decodeResponse(t, body)
	assert.EqualValues(t, http.StatusTooManyRequests, r.Result.Code)
	assert.EqualValues(t, 3, r.Result.Details.RetryAfterSeconds)
	assert.Contains(t, r.Result.Message, "2 pod reviews in flight, the webhook's limit; retry")
	assert.Less(t, time.Since(t0), 500*time.Millisecond, "shed at once, not queued")

	resp, _ := e.admit(PathEviction, fixture(t, "eviction-v1.json"))
	assert.True(t, resp.Allowed, "the eviction path is not blocked by the pod flood")
	assert.Equal(t, "pod is not checkpoint-enabled", resp.Result.Message)
	release()
	wg.Wait()
	// The slots are free again.
	resp, _ = e.admit(PathMutatePod, rsPod(t, false))
	assert.True(t, resp.Allowed, "%v", resp.Result)
}

// With the informer caches, a pod-creation review makes no API request at all.
func TestPodReviewReadsCachesNotTheAPI(t *testing.T) {
	rs := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	require.NoError(t, rs.Add(webRS))
	pvcs := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	e := newEnv(t, Config{}, nil, func(_ *Config, d *Deps) {
		d.ReplicaSets = appsv1listers.NewReplicaSetLister(rs)
		d.PVCs = corev1listers.NewPersistentVolumeClaimLister(pvcs)
	})
	resp, patched := e.admit(PathMutatePod, rsPod(t, false))
	require.True(t, resp.Allowed, "%v", resp.Result)
	require.NotNil(t, patched)
	assert.Contains(t, string(patched), `"stasis.dev/identity":"rs/default/web-rs"`)
	assert.Empty(t, e.client.Actions(), "no API request: owner and PVC came from the caches")
}

// Until the caches are synced every review is answered 429: an empty cache would let the eviction
// of a checkpoint-enabled pod through unchecked.
func TestReviewsBeforeCacheSyncAnswer429(t *testing.T) {
	var synced sync.Map
	e := newEnv(t, Config{}, nil, func(_ *Config, d *Deps) {
		d.Synced = func() bool { _, ok := synced.Load("yes"); return ok }
	})
	code, body := e.post(PathEviction, fixture(t, "eviction-v1.json"))
	require.Equal(t, http.StatusOK, code)
	r := decodeResponse(t, body)
	assert.EqualValues(t, http.StatusTooManyRequests, r.Result.Code)
	assert.Contains(t, r.Result.Message, "caches are not synced yet")
	synced.Store("yes", true)
	resp, _ := e.admit(PathEviction, fixture(t, "eviction-v1.json"))
	assert.True(t, resp.Allowed)
}

// A dry-run review records no Event; the same review for real does.
func TestDryRunReviewRecordsNoEvent(t *testing.T) {
	e := newEnv(t, Config{}, nil)
	refused := func(dry bool) []byte {
		p := reviewObject[corev1.Pod](t, fixture(t, "pod-create-job-command.json"))
		p.OwnerReferences = []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: "ds", UID: "ds-uid", Controller: ptr.To(true)}}
		return podReview(t, p, dry)
	}
	resp, _ := e.admit(PathMutatePod, refused(true))
	assert.False(t, resp.Allowed)
	assert.Empty(t, e.drainEvents(), "dry run: no Event")
	resp, _ = e.admit(PathMutatePod, refused(false))
	assert.False(t, resp.Allowed)
	assert.True(t, containsEvent(e.drainEvents(), "Warning CheckpointConfigRefused pod refused"))
}

func testutilCounter(t *testing.T, e *testEnv, name, labels string) float64 {
	return sample(t, e, name, labels, func(m *dto.Metric) float64 { return m.GetCounter().GetValue() })
}

func gauge(t *testing.T, e *testEnv, name, labels string) float64 {
	return sample(t, e, name, labels, func(m *dto.Metric) float64 { return m.GetGauge().GetValue() })
}

func sample(t *testing.T, e *testEnv, name, labels string, value func(*dto.Metric) float64) float64 {
	t.Helper()
	mfs, err := e.reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		total := 0.0
		for _, m := range mf.GetMetric() {
			s := ""
			for i, l := range m.GetLabel() {
				if i > 0 {
					s += ","
				}
				s += l.GetName() + `="` + l.GetValue() + `"`
			}
			if s == labels {
				total += value(m)
			}
		}
		return total
	}
	return 0
}
