//go:build integration

package integration

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/stasis-k8s/stasis/tests/fakeagent"
)

// drainArgs are what an operator types; --force because the test's plain pods have no controller,
// --delete-emptydir-data because wired pods carry the tools emptyDir.
func drainArgs(node string) []string {
	return []string{"drain", node, "--ignore-daemonsets", "--force", "--delete-emptydir-data", "--timeout=180s"}
}

// pvcRecords counts the checkpoint records (annotations checkpoint.stasis.dev/*) on a PVC.
func (s *scenario) pvcRecords(name string) int {
	s.t.Helper()
	pvc, err := s.c.CoreV1().PersistentVolumeClaims(s.ns).Get(s.ctx, name, metav1.GetOptions{})
	require.NoError(s.t, err)
	n := 0
	for k := range pvc.Annotations {
		if strings.HasPrefix(k, "checkpoint.stasis.dev/") {
			n++
		}
	}
	return n
}

// Scenario 1: kubectl drain of a node with two checkpoint-enabled pods and one ordinary pod. The
// ordinary pod goes without any agent call; each enabled pod's eviction is answered 429 while its
// dump runs (scripted longer than the webhook's wait budget) and allowed once the dump is done.
func TestDrainWaitsForCheckpointsWith429_NoKubelet(t *testing.T) {
	s := newScenario(t, "s1-drain", "a")
	node := s.nodes[0]
	s.createPVC("checkpoints")
	for _, name := range []string{"ckpt-1", "ckpt-2"} {
		// 3× the budget: the first eviction is answered 429, kubectl retries 5 s later.
		env.agent.SetScript(s.ns, name, fakeagent.Script{Duration: 3 * waitBudget, Bytes: 300 << 20})
		s.createPod(name, podOpts{node: node, pvc: "checkpoints", labels: enabled(storageLabel, "checkpointing")})
	}
	s.createPod("ordinary", podOpts{node: node})
	tooManyBefore := s.metric("stasis_webhook_too_many_requests_total", "webhook", "eviction")

	out, err := s.kubectl(drainArgs(node)...)
	require.NoError(t, err, "kubectl drain failed:\n%s", out)
	t.Logf("kubectl drain:\n%s", out)

	// Held with 429 while the dump ran; kubectl said it would retry.
	assert.Contains(t, out, "will retry after 5s")
	assert.Contains(t, out, "checkpoint of pod s1-drain/ckpt-1 in progress")
	assert.Contains(t, out, "checkpoint of pod s1-drain/ckpt-2 in progress")
	assert.Contains(t, out, "node/"+node+" drained")
	assert.GreaterOrEqual(t, s.metric("stasis_webhook_too_many_requests_total", "webhook", "eviction")-tooManyBefore, 2)

	// One dump per enabled pod, none for the ordinary pod.
	assert.Equal(t, 1, env.agent.DumpsOf(s.ns, "ckpt-1"))
	assert.Equal(t, 1, env.agent.DumpsOf(s.ns, "ckpt-2"))
	assert.Equal(t, 0, env.agent.DumpsOf(s.ns, "ordinary"))
	assert.Equal(t, 2, env.agent.DumpsIn(s.ns))

	pods, err := s.c.CoreV1().Pods(s.ns).List(s.ctx, metav1.ListOptions{})
	require.NoError(t, err)
	assert.Empty(t, pods.Items, "drain evicted every pod")
	// Both checkpoints are recorded on the PVC, so re-created pods can restore.
	assert.Equal(t, 2, s.pvcRecords("checkpoints"))
	s.waitEvent("Pod", "ckpt-1", "checkpointed for eviction")
	s.waitEvent("Pod", "ckpt-2", "checkpointed for eviction")
}

// Scenario 2: the agent fails a dump. fail-closed: drain fails with the agent's reason and an
// Event on the pod; fail-open: drain completes and the Event says progress will be lost.
func TestDrainAgentFailure_FailClosedThenFailOpen_NoKubelet(t *testing.T) {
	s := newScenario(t, "s2-failure", "a")
	node := s.nodes[0]
	const reason = "criu dump failed: Error (criu/cr-dump.c:2093): Dumping FAILED (scripted by the fake agent)"
	env.agent.SetScript(s.ns, "doomed", fakeagent.Script{Duration: 300 * time.Millisecond, Fail: reason})
	s.createPVC("checkpoints")
	pod := s.createPod("doomed", podOpts{node: node, pvc: "checkpoints", labels: enabled(storageLabel, "checkpointing")})

	t.Run("fail-closed", func(t *testing.T) {
		args := append(drainArgs(node)[:5], "--timeout=60s")
		out, err := s.kubectl(args...)
		require.Error(t, err, "drain must fail when the checkpoint fails (fail-closed):\n%s", out)
		t.Logf("kubectl drain:\n%s", out)
		assert.Contains(t, out, reason, "kubectl shows the agent's reason")
		assert.Contains(t, out, "fail-closed")
		p, err := s.c.CoreV1().Pods(s.ns).Get(s.ctx, "doomed", metav1.GetOptions{})
		require.NoError(t, err, "the pod is still there")
		assert.Nil(t, p.DeletionTimestamp)
		ev := s.waitEvent("Pod", "doomed", reason, "fail-closed")
		assert.Equal(t, corev1.EventTypeWarning, ev.Type)
		assert.Equal(t, 0, s.pvcRecords("checkpoints"), "a failed dump is never recorded")
	})

	t.Run("fail-open", func(t *testing.T) {
		require.NoError(t, env.webhook.restart(s.ctx, "fail-open"))
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			require.NoError(t, env.webhook.restart(ctx, "fail-closed"))
		})
		out, err := s.kubectl(drainArgs(node)...)
		require.NoError(t, err, "drain completes with fail-open:\n%s", out)
		t.Logf("kubectl drain:\n%s", out)
		s.waitGone("doomed", string(pod.UID))
		ev := s.waitEvent("Pod", "doomed", reason, "progress since the last checkpoint will be lost")
		assert.Equal(t, corev1.EventTypeWarning, ev.Type)
		assert.Equal(t, 0, s.pvcRecords("checkpoints"), "a failed dump is never recorded")
		assert.Equal(t, 2, env.agent.DumpsOf(s.ns, "doomed"), "a failed operation is forgotten: the next eviction dumps again")
	})
}

// Scenario 7a: two concurrent drains of the node evict the same pod: one dump, both join it.
func TestConcurrentDrainsShareOneDump_NoKubelet(t *testing.T) {
	s := newScenario(t, "s7-concurrent", "a")
	node := s.nodes[0]
	env.agent.SetScript(s.ns, "shared", fakeagent.Script{Duration: 4 * waitBudget, Bytes: 1 << 30})
	s.createPVC("checkpoints")
	s.createPod("shared", podOpts{node: node, pvc: "checkpoints", labels: enabled(storageLabel, "checkpointing")})
	postsBefore := env.agent.Posts()

	var wg sync.WaitGroup
	outs, errs := make([]string, 2), make([]error, 2)
	for i := range outs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			outs[i], errs[i] = s.kubectl(drainArgs(node)...)
		}()
	}
	wg.Wait()
	for i := range outs {
		require.NoError(t, errs[i], "drain %d:\n%s", i, outs[i])
		t.Logf("kubectl drain %d:\n%s", i, outs[i])
	}
	assert.Equal(t, 1, env.agent.DumpsOf(s.ns, "shared"), "one dump for both drains")
	assert.GreaterOrEqual(t, env.agent.Posts()-postsBefore, 3, "both drains asked, and retried")
	assert.Equal(t, 1, s.pvcRecords("checkpoints"))
}

// Scenario 7b: the webhook restarts in the middle of a 429 sequence; the next retry joins the
// dump already running on the agent instead of starting another. The evictions are posted like
// kubectl drain posts them (client-go, retry on 429): kubectl would fail at once on the 500 the API
// server answers while no webhook is listening, which is exactly the window a restart opens.
func TestWebhookRestartMid429JoinsSameDump_NoKubelet(t *testing.T) {
	s := newScenario(t, "s7-restart", "a")
	node := s.nodes[0]
	env.agent.SetScript(s.ns, "survivor", fakeagent.Script{Duration: 4 * waitBudget, Bytes: 1 << 30})
	s.createPVC("checkpoints")
	pod := s.createPod("survivor", podOpts{node: node, pvc: "checkpoints", labels: enabled(storageLabel, "checkpointing")})

	err := s.evict("survivor", false)
	require.True(t, apierrors.IsTooManyRequests(err), "first eviction is held with 429, got %v", err)
	assert.Equal(t, 1, env.agent.DumpsOf(s.ns, "survivor"))

	require.NoError(t, env.webhook.restart(s.ctx, "fail-closed"))

	retries := 0
	for {
		err = s.evict("survivor", false)
		if err == nil {
			break
		}
		require.True(t, apierrors.IsTooManyRequests(err), "retry %d: want 429 or success, got %v", retries, err)
		retries++
		select {
		case <-s.ctx.Done():
			t.Fatal("eviction never allowed")
		case <-time.After(time.Second):
		}
	}
	s.waitGone("survivor", string(pod.UID))
	assert.Equal(t, 1, env.agent.DumpsOf(s.ns, "survivor"), "the restarted webhook joined the running dump")
	assert.Equal(t, 1, s.pvcRecords("checkpoints"))
}

// Scenario 8: draining the node that runs the webhook itself does not deadlock: the webhook's own
// namespace (stasis-system) is excluded by the configurations' namespaceSelector, so evicting the
// webhook's pod never waits for the webhook. (Here the webhook process runs on the host; its pod
// on the drained node stands in for it. In a cluster, run 2 replicas with a PodDisruptionBudget so
// that the other replica answers while this one moves: deploy/ does that.)
func TestDrainNodeRunningWebhookDoesNotDeadlock_NoKubelet(t *testing.T) {
	s := newScenario(t, "s8-self", "a")
	node := s.nodes[0]
	// The webhook's "own" pod, labelled as the Deployment labels it, even checkpoint-enabled:
	// still excluded.
	sys := &scenario{t: t, ctx: s.ctx, ns: "stasis-system", c: s.c}
	self := sys.podObject("stasis-webhook-on-"+node, podOpts{node: node, labels: map[string]string{
		"app.kubernetes.io/name": "stasis-webhook", modeLabel: "true"}})
	_, err := s.c.CoreV1().Pods("stasis-system").Create(s.ctx, self, metav1.CreateOptions{})
	require.NoError(t, err)
	t.Cleanup(func() {
		zero := int64(0)
		_ = s.c.CoreV1().Pods("stasis-system").Delete(context.Background(), self.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
	})
	sys.waitRunning(self.Name)
	s.createPVC("checkpoints")
	env.agent.SetScript(s.ns, "user-pod", fakeagent.Script{Duration: 3 * waitBudget})
	s.createPod("user-pod", podOpts{node: node, pvc: "checkpoints", labels: enabled(storageLabel, "checkpointing")})
	sysBefore, _ := env.webhook.reviews("stasis-system", "")

	out, err := s.kubectl(drainArgs(node)...)
	require.NoError(t, err, "drain of the webhook's node:\n%s", out)
	t.Logf("kubectl drain:\n%s", out)
	sysAfter, err := env.webhook.reviews("stasis-system", "")
	require.NoError(t, err)
	assert.Equal(t, sysBefore, sysAfter, "no request about stasis-system reached the webhook")
	assert.Equal(t, 0, env.agent.DumpsIn("stasis-system"))
	assert.Equal(t, 1, env.agent.DumpsOf(s.ns, "user-pod"), "the user's pod on the same node was still checkpointed")
	_, err = s.c.CoreV1().Pods("stasis-system").Get(s.ctx, self.Name, metav1.GetOptions{})
	assert.True(t, apierrors.IsNotFound(err), "the webhook's pod was evicted: %v", err)

	// With no webhook answering at all (its last replica moving), pods of stasis-system can still
	// be evicted — nothing waits for the webhook — while a user pod's eviction is refused
	// (failurePolicy Fail: never evicted without its checkpoint).
	other := sys.podObject("stasis-agent-on-"+node, podOpts{node: s.nodes[0], labels: map[string]string{"app.kubernetes.io/name": "stasis-agent"}})
	_, err = s.c.CoreV1().Pods("stasis-system").Create(s.ctx, other, metav1.CreateOptions{})
	require.NoError(t, err)
	t.Cleanup(func() {
		zero := int64(0)
		_ = s.c.CoreV1().Pods("stasis-system").Delete(context.Background(), other.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
	})
	sys.waitRunning(other.Name)
	s.createPod("user-pod-2", podOpts{node: node, pvc: "checkpoints", labels: enabled(storageLabel, "checkpointing")})
	require.NoError(t, env.webhook.stop())
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		require.NoError(t, env.webhook.start(ctx))
	})
	assert.NoError(t, sys.evict(other.Name, false), "stasis-system is evicted without the webhook")
	err = s.evict("user-pod-2", false)
	require.Error(t, err, "a checkpoint-enabled pod is not evicted while no webhook answers")
	t.Logf("eviction with the webhook down: %v", err)
}
