//go:build integration

package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/utils/ptr"

	"github.com/stasis-k8s/stasis/tests/cluster"
	"github.com/stasis-k8s/stasis/tests/fakeagent"
	"github.com/stasis-k8s/stasis/webhook/catalog"
	"github.com/stasis-k8s/stasis/wiring"
)

// floodPod is a checkpoint-enabled plain pod naming the user's PVC "checkpointing-volume" (the
// issue's flood: valid labels, a PVC volume).
func (s *scenario) floodPod(i int) *corev1.Pod {
	return s.podObject(fmt.Sprintf("flood-%d", i), podOpts{pvc: "checkpointing-volume", labels: enabled(storageLabel, "checkpointing")})
}

// A flood of pod creations does not delay an eviction: the eviction path has its own client,
// rate limiter and bulkhead, and pod reviews read caches only. Issue 13: 200/s dry-run creations
// made every eviction in the cluster fail for minutes.
func TestPodFloodDoesNotDelayEviction_NoKubelet(t *testing.T) {
	s := newScenario(t, "load-flood", "a")
	s.createPVC("checkpointing-volume")
	for _, name := range []string{"base", "during", "after"} {
		s.createPod(name, podOpts{node: s.nodes[0], pvc: "checkpointing-volume", labels: enabled(storageLabel, "checkpointing")})
	}
	base, err := s.timedEviction("base")
	require.NoError(t, err, "eviction without flood")

	c, err := floodClient()
	require.NoError(t, err)
	fctx, cancel := context.WithCancel(s.ctx)
	defer cancel()
	statsc := make(chan floodStats, 1)
	go func() { statsc <- flood(fctx, c, s.ns, 150, 6*time.Second, true, s.floodPod) }()
	time.Sleep(2 * time.Second) // the flood is at full rate
	during, err := s.timedEviction("during")
	require.NoError(t, err, "eviction during the flood")
	st := <-statsc
	after, err := s.timedEviction("after")
	require.NoError(t, err, "eviction right after the flood")
	t.Logf("flood: %d sent at %.0f/s, %d ok, %d shed (429), %d webhook failures, %d API throttled, other %v; client p50 %s p99 %s max %s",
		st.sent, st.achievedRate, st.ok, st.shed, st.webhookFailures, st.apiThrottled, st.other,
		quantile(st.latencies, .5), quantile(st.latencies, .99), quantile(st.latencies, 1))
	t.Logf("eviction: %s without flood, %s during (ratio %.2f), %s right after (ratio %.2f)",
		base, during, during.Seconds()/base.Seconds(), after, after.Seconds()/base.Seconds())
	assert.Zero(t, st.webhookFailures, "no pod review failed by timeout or unreachable webhook")
	assert.Empty(t, st.other)
	// No timing assertion on the ratio during the flood (2 cores shared by the API server, etcd,
	// the flood's client and the webhook: every latency grows with the CPU queue). The eviction
	// during the flood was allowed (above: no error, no webhook timeout), and right after the flood
	// there is no backlog: the eviction is decided on its first dump, within the wait budget.
	assert.Less(t, after, waitBudget, "no backlog after the flood")
	s.waitEvent("Pod", "during", "checkpointed for eviction")
}

// A review whose deadline passes is answered with the policy (429, retry) before the API
// server's timeout, never by a hang: here the configuration's timeoutSeconds (1) is below the
// wait budget (2 s) and the dump never ends on its own; the webhook reads the API server's
// ?timeout= for its deadline (1 s → 100 ms, the floor of a tenth when the margin exceeds it).
func TestReviewPastDeadlineAnswers429NotTimeout_NoKubelet(t *testing.T) {
	s := newScenario(t, "load-deadline", "a")
	s.createPVC("checkpointing-volume")
	env.agent.SetScript(s.ns, "slow", fakeagent.Script{Polls: -1})
	pod := s.createPod("slow", podOpts{node: s.nodes[0], pvc: "checkpointing-volume", labels: enabled(storageLabel, "checkpointing")})
	setEvictionTimeout(t, s, 1)

	// The API server picks the new timeout up from its own informer: until then the answers are
	// the wait budget's "in progress".
	var err error
	var took time.Duration
	s.eventually("an eviction under timeoutSeconds 1", func() (bool, error) {
		t0 := time.Now()
		err = s.evictOnce("slow")
		took = time.Since(t0)
		return took < time.Second, nil
	})
	// The deadline (100 ms) cut the wait for the dump short: "in progress" (the decision saw its
	// context end) or "not decided within its deadline" (it had not returned yet), both 429.
	assert.True(t, apierrors.IsTooManyRequests(err), "429, which kubectl drain retries: %v", err)
	assert.Regexp(t, `in progress: .* written, retry|review not decided within its deadline \(100ms\); retry`, err.Error())
	assert.NotContains(t, err.Error(), "failed calling webhook", "answered by the webhook, not timed out by the API server")
	assert.Less(t, took, time.Second, "answered before the configuration's timeout of 1 s")
	if strings.Contains(err.Error(), "within its deadline") {
		// client-go retries such an answer by itself (s.evict would have, ten times).
		var se *apierrors.StatusError
		if assert.ErrorAs(t, err, &se) && assert.NotNil(t, se.ErrStatus.Details, "Retry-After reaches the client: %#v", se.ErrStatus) {
			assert.EqualValues(t, 1, se.ErrStatus.Details.RetryAfterSeconds)
		}
	}

	// Back to 30 s: the dump started by the first attempt is still the one every retry joins.
	setEvictionTimeout(t, s, 30)
	s.eventually("an eviction under timeoutSeconds 30", func() (bool, error) {
		err := s.evictOnce("slow")
		return err != nil && strings.Contains(err.Error(), "in progress"), nil
	})
	env.agent.Finish(string(pod.UID))
	took, err = s.timedEviction("slow")
	require.NoError(t, err)
	t.Logf("eviction allowed %s after the dump finished", took)
	assert.Equal(t, 1, env.agent.DumpsOf(s.ns, "slow"), "one dump: the retries joined it")
}

// evictOnce posts one Eviction without client-go's own retry of 429s that carry a Retry-After
// (which s.evict does, ten times, as every client-go caller would).
func (s *scenario) evictOnce(name string) error {
	ev := &policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: s.ns}}
	return s.c.CoreV1().RESTClient().Post().Namespace(s.ns).Resource("pods").Name(name).SubResource("eviction").
		MaxRetries(0).Body(ev).Do(s.ctx).Error()
}

// setEvictionTimeout sets timeoutSeconds of evictions.stasis.dev and waits until the API server
// uses it (its configuration informer lags); it is put back to deploy/'s 30 when the test ends.
func setEvictionTimeout(t *testing.T, s *scenario, seconds int32) {
	set := func(ctx context.Context, v int32) error {
		vc := s.c.AdmissionregistrationV1().ValidatingWebhookConfigurations()
		c, err := vc.Get(ctx, "stasis", metav1.GetOptions{})
		if err != nil {
			return err
		}
		for i := range c.Webhooks {
			if c.Webhooks[i].Name == "evictions.stasis.dev" {
				c.Webhooks[i].TimeoutSeconds = ptr.To(v)
			}
		}
		_, err = vc.Update(ctx, c, metav1.UpdateOptions{})
		return err
	}
	require.NoError(t, set(s.ctx, seconds))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = set(ctx, 30)
	})
}

// The caches are warm before readiness: a fresh webhook process answers nothing but 429 ("not
// synced") until its caches are synced, and once /readyz says ready its first pod review already
// sees the checkpoint record on the PVC (restore). Before the caches, an empty cache would have
// wired the pod without its restore (and allowed evictions unchecked).
func TestCacheWarmBeforeReadiness_NoKubelet(t *testing.T) {
	s := newScenario(t, "load-ready")
	id := "pod/" + s.ns + "/warm"
	rec, _ := json.Marshal(catalog.Record{Identity: id, ID: "ckpt-w", Node: "n", Time: time.Now().UTC(), Size: 1,
		Containers: map[string]string{"app": "ckpt-w"}})
	s.createPVC("checkpointing-volume")
	pvc, err := s.c.CoreV1().PersistentVolumeClaims(s.ns).Get(s.ctx, "checkpointing-volume", metav1.GetOptions{})
	require.NoError(t, err)
	pvc.Annotations = map[string]string{catalog.RecordKey(id): string(rec)}
	_, err = s.c.CoreV1().PersistentVolumeClaims(s.ns).Update(s.ctx, pvc, metav1.UpdateOptions{})
	require.NoError(t, err)
	review := s.podReview(s.podObject("warm", podOpts{pvc: "checkpointing-volume", labels: enabled(storageLabel, "checkpointing")}))

	w2, err := env.webhook.second("webhook-2.log")
	require.NoError(t, err)
	t.Cleanup(func() { _ = w2.stop() })
	ready := make(chan error, 1)
	go func() { ready <- w2.start(s.ctx) }()
	answers := map[string]int{}
	for waiting := true; waiting; {
		select {
		case err := <-ready:
			require.NoError(t, err)
			waiting = false
		default:
			answers[w2.answer(s.ctx, review)]++
			time.Sleep(2 * time.Millisecond)
		}
	}
	t.Logf("answers before ready: %v", answers)
	for a := range answers {
		assert.Contains(t, []string{"unreachable", "429 not synced", "allowed with restore"}, a,
			"before ready: unreachable, 429, or the decision of a synced cache; never one without the record")
	}
	assert.Equal(t, "allowed with restore", w2.answer(s.ctx, review), "the first review after ready sees the record")
}

// podReview is a v1 AdmissionReview of a pod creation in the scenario's namespace.
func (s *scenario) podReview(p *corev1.Pod) []byte {
	raw, err := json.Marshal(p)
	require.NoError(s.t, err)
	b, err := json.Marshal(admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Request: &admissionv1.AdmissionRequest{UID: "warm-1", Kind: metav1.GroupVersionKind{Version: "v1", Kind: "Pod"},
			Resource: metav1.GroupVersionResource{Version: "v1", Resource: "pods"}, Name: p.Name, Namespace: s.ns,
			Operation: admissionv1.Create, Object: runtime.RawExtension{Raw: raw}, DryRun: ptr.To(true)},
	})
	require.NoError(s.t, err)
	return b
}

// second is another webhook process like w, on its own ports and log (w keeps serving the API server).
func (w *webhookProcess) second(log string) (*webhookProcess, error) {
	port, err := cluster.FreePort("127.0.0.1")
	if err != nil {
		return nil, err
	}
	health, err := cluster.FreePort("127.0.0.1")
	if err != nil {
		return nil, err
	}
	c := &webhookProcess{e: w.e, port: port, healthPort: health, policy: w.policy,
		logPath: filepath.Join(w.e.cluster.LogDir(), log)}
	for _, a := range w.args {
		switch {
		case strings.HasPrefix(a, "--listen="):
			a = "--listen=127.0.0.1:" + strconv.Itoa(port)
		case strings.HasPrefix(a, "--health-listen="):
			a = "--health-listen=127.0.0.1:" + strconv.Itoa(health)
		}
		c.args = append(c.args, a)
	}
	return c, nil
}

// answer posts a review to this process and classifies the answer.
func (w *webhookProcess) answer(ctx context.Context, review []byte) string {
	resp, err := postReview(ctx, w.url("/mutate/pod"), review)
	if err != nil {
		return "unreachable"
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Sprintf("HTTP %d", resp.StatusCode)
	}
	var out admissionv1.AdmissionReview
	if json.Unmarshal(body, &out) != nil || out.Response == nil {
		return "undecodable"
	}
	r := out.Response
	switch {
	case !r.Allowed && r.Result != nil && r.Result.Code == 429 && strings.Contains(r.Result.Message, "not synced"):
		return "429 not synced"
	case !r.Allowed:
		return "denied: " + r.Result.Message
	case strings.Contains(string(r.Patch), wiring.AnnotationRestore) || strings.Contains(string(r.Patch), "stasis.dev~1restore"):
		return "allowed with restore"
	default:
		return "allowed without restore"
	}
}
