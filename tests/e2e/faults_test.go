//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/stasis-k8s/stasis/tests/e2e/harness"
)

// Fault suite (issue 14): an app frozen by its checkpoint must run again when its pod stays.

// evictRefusedAfterDump evicts the pod with a UID precondition that cannot match: the webhook
// holds the eviction until the checkpoint is complete (429s, retried as kubectl does) and allows
// it; the API server then refuses it (409), as it refuses one a PodDisruptionBudget forbids after
// the webhooks. The pod stays, its app frozen. Returns when the API server has refused.
func evictRefusedAfterDump(t *testing.T, ns, pod string) time.Time {
	ctx := context.Background()
	wrong := types.UID("00000000-0000-0000-0000-000000000000")
	ev := &policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Name: pod, Namespace: ns},
		DeleteOptions: &metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &wrong}}}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		err := env.Client.PolicyV1().Evictions(ns).Evict(ctx, ev)
		if apierrors.IsConflict(err) {
			return time.Now()
		}
		require.True(t, apierrors.IsTooManyRequests(err) && time.Now().Before(deadline), "eviction: want 429 then 409, got %v", err)
		time.Sleep(time.Second)
	}
}

// runsAgain waits until the counter prints a number after last, and returns how long that took.
func runsAgain(t *testing.T, ns, pod string, last int, since time.Time) time.Duration {
	out, err := env.WaitCount(context.Background(), ns, pod, last+2, 2*time.Minute)
	require.NoError(t, err, "the app never ran again after its checkpoint")
	assert.Equal(t, 1, out.FreshStarts, "the same process runs on (no restart)")
	return time.Since(since)
}

func startCounterPod(t *testing.T, ns string) (*corev1.Pod, harness.CounterOutput) {
	ctx := context.Background()
	_, err := env.CreateCounterJob(ctx, ns, harness.CounterSpec{Name: "counter", Checkpoint: true, Args: []string{"--interval=300ms"}})
	require.NoError(t, err)
	pod, err := env.WaitJobPod(ctx, ns, "counter", 2*time.Minute)
	require.NoError(t, err)
	out, err := env.WaitCount(ctx, ns, pod.Name, 5, time.Minute)
	require.NoError(t, err)
	return pod, out
}

// The API server refuses the eviction after the webhook allowed it: the agent sees that the pod is
// not being deleted once the webhook stops asking, and thaws the app within seconds (not after
// --freeze-timeout), with an Event that says why.
func TestFaultEvictionRefusedAfterDumpThaws(t *testing.T) {
	ns := newNamespace(t, "f1")
	pod, _ := startCounterPod(t, ns)
	refused := evictRefusedAfterDump(t, ns, pod.Name)
	frozen, err := env.Logs(context.Background(), ns, pod.Name)
	require.NoError(t, err)
	took := runsAgain(t, ns, pod.Name, frozen.Last(), refused)
	t.Logf("the app ran again %.1fs after the API server refused the eviction (--release-after 15s)", took.Seconds())
	assert.Less(t, took, 60*time.Second, "released long before --freeze-timeout (5m)")
	ev := waitEvent(t, ns, pod.Name, "resumed the app frozen by its checkpoint")
	assert.Contains(t, ev, "was not deleted within")
}

// The agent is killed (a DaemonSet rollout, an OOM kill) while the app is frozen and no deletion
// follows: the new agent adopts the operation from the node's record and thaws the app.
func TestFaultAgentKilledWhileFrozen(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t, "f2")
	pod, _ := startCounterPod(t, ns)
	refused := evictRefusedAfterDump(t, ns, pod.Name)
	frozen, err := env.Logs(ctx, ns, pod.Name)
	require.NoError(t, err)

	agents, err := env.Client.CoreV1().Pods(harness.StasisNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=stasis-agent"})
	require.NoError(t, err)
	var killed string
	zero := int64(0)
	for _, a := range agents.Items {
		if a.Spec.NodeName == pod.Spec.NodeName {
			killed = a.Name
			require.NoError(t, env.Client.CoreV1().Pods(harness.StasisNamespace).Delete(ctx, a.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}))
		}
	}
	require.NotEmpty(t, killed, "no agent on node %s", pod.Spec.NodeName)
	took := runsAgain(t, ns, pod.Name, frozen.Last(), refused)
	t.Logf("agent %s killed while the app was frozen; the app ran again %.1fs after the refused eviction", killed, took.Seconds())
	ev := waitEvent(t, ns, pod.Name, "resumed the app frozen by its checkpoint")
	assert.True(t, strings.Contains(ev, "was not deleted within") || strings.Contains(ev, "freeze-timeout"), ev)
}

// Every ending (issue 15): a Job pod deleted with kubectl delete (no eviction, no webhook) is
// checkpointed on SIGTERM; the Job's replacement, created without any record of that checkpoint,
// continues from it, and the deleted pod does not count against backoffLimit (0 here). Indexed:
// the identity is the index; NonIndexed: the replacement takes the deleted pod's slot.
func TestJobPodDeletedContinues(t *testing.T) {
	for _, indexed := range []bool{true, false} {
		t.Run(map[bool]string{true: "Indexed", false: "NonIndexed"}[indexed], func(t *testing.T) {
			ctx := context.Background()
			ns := newNamespace(t, "del")
			_, err := env.CreateCounterJob(ctx, ns, harness.CounterSpec{Name: "counter", Checkpoint: true, Indexed: indexed, Args: []string{"--interval=300ms", "--to=60"}})
			require.NoError(t, err)
			pod, err := env.WaitJobPod(ctx, ns, "counter", 2*time.Minute)
			require.NoError(t, err)
			follow := env.Follow(ctx, ns, pod.Name)
			_, err = env.WaitCount(ctx, ns, pod.Name, 8, time.Minute)
			require.NoError(t, err)
			t0 := time.Now()
			out, err := env.Run(ctx, "-n", ns, "delete", "pod", pod.Name)
			require.NoError(t, err, out)
			t.Logf("kubectl delete pod took %s (checkpoint on SIGTERM included)", time.Since(t0).Round(10*time.Millisecond))
			before, err := follow.Wait(time.Minute)
			require.NoError(t, err)
			next, err := env.WaitJobPod(ctx, ns, "counter", 2*time.Minute, pod)
			require.NoError(t, err)
			after, err := env.WaitCount(ctx, ns, next.Name, 0, 2*time.Minute)
			require.NoError(t, err)
			continues(t, before, after)
			job, err := env.WaitJobComplete(ctx, ns, "counter", 3*time.Minute)
			require.NoError(t, err)
			assert.True(t, harness.JobSucceeded(job), "Job must complete; status %+v", job.Status)
			assert.Zero(t, job.Status.Failed, "the deleted pod must not count against backoffLimit")
		})
	}
}

// A one-replica Deployment scaled to 0 and back to 1 (issue 15): the pod deleted by the scale-down
// is checkpointed on SIGTERM, and the new pod continues.
func TestDeploymentScaledDownAndUpContinues(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t, "scale")
	_, err := env.CreateCounterDeployment(ctx, ns, harness.CounterSpec{Name: "counter", Checkpoint: true, Args: []string{"--interval=300ms"}})
	require.NoError(t, err)
	pod, err := env.WaitPodWithLabel(ctx, ns, "app=counter", 2*time.Minute)
	require.NoError(t, err)
	follow := env.Follow(ctx, ns, pod.Name)
	_, err = env.WaitCount(ctx, ns, pod.Name, 8, time.Minute)
	require.NoError(t, err)
	scale := func(n int) {
		out, err := env.Run(ctx, "-n", ns, "scale", "deployment/counter", fmt.Sprintf("--replicas=%d", n))
		require.NoError(t, err, out)
	}
	scale(0)
	before, err := follow.Wait(time.Minute)
	require.NoError(t, err)
	require.NoError(t, env.WaitPodGone(ctx, ns, pod.Name, time.Minute))
	scale(1)
	next, err := env.WaitPodWithLabel(ctx, ns, "app=counter", 2*time.Minute, pod)
	require.NoError(t, err)
	after, err := env.WaitCount(ctx, ns, next.Name, 0, time.Minute)
	require.NoError(t, err)
	continues(t, before, after)
}

// A termination whose dump cannot finish within the pod's grace period (1 s, 3 GiB of memory):
// the kubelet kills the container mid-dump, the partial checkpoint is never completed, and the
// next pod continues from the previous complete one (issue 15). The memory is incompressible
// and changes on every line, so the termination's dump shares no chunk with the eviction's and
// must write all 3 GiB (a dump of an unchanged heap only names its chunks: about 1 s here).
func TestDumpCutByGracePeriodKeepsThePreviousCheckpoint(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t, "grace")
	// The kubelet's SIGKILL (137) counts against backoffLimit: allow it once.
	_, err := env.CreateCounterJob(ctx, ns, harness.CounterSpec{Name: "counter", Checkpoint: true, Indexed: true, GraceSeconds: 1, BackoffLimit: 1,
		Args: []string{"--interval=300ms", "--touch-mib=3072", "--touch-random", "--touch-vary"}})
	require.NoError(t, err)
	pod, err := env.WaitJobPod(ctx, ns, "counter", 3*time.Minute)
	require.NoError(t, err)
	_, err = env.WaitCount(ctx, ns, pod.Name, 5, 2*time.Minute)
	require.NoError(t, err)
	// The previous checkpoint: an eviction (held by the webhook, no grace period involved).
	_, err = env.Evict(ctx, ns, pod.Name)
	require.NoError(t, err)
	first, err := env.WaitJobPod(ctx, ns, "counter", 3*time.Minute, pod)
	require.NoError(t, err)
	restored, err := env.WaitCount(ctx, ns, first.Name, 5, 2*time.Minute)
	require.NoError(t, err)
	require.Zero(t, restored.FreshStarts, "restored from the eviction's checkpoint")

	out, err := env.Run(ctx, "-n", ns, "delete", "pod", first.Name, "--wait=false")
	require.NoError(t, err, out)
	second, err := env.WaitJobPod(ctx, ns, "counter", 3*time.Minute, pod, first)
	require.NoError(t, err)
	again, err := env.WaitCount(ctx, ns, second.Name, 1, 2*time.Minute)
	require.NoError(t, err)
	assert.Zero(t, again.FreshStarts, "restored, not started afresh")
	assert.Equal(t, restored.First(), again.First(), "from the eviction's checkpoint again: the cut dump was never completed")
}

// The agent is killed in the middle of a dump during an eviction (issue 14): the evicting client
// gets 429s while the node has no ready agent, and its retries are allowed once the new agent has
// taken a complete checkpoint; the replacement continues from it.
func TestFaultAgentKilledMidDump(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t, "middump")
	// 2 GiB of incompressible memory: the dump writes all of it, seconds, so 0.7 s is mid-dump.
	_, err := env.CreateCounterJob(ctx, ns, harness.CounterSpec{Name: "counter", Checkpoint: true, Indexed: true,
		Args: []string{"--interval=300ms", "--touch-mib=2048", "--touch-random"}})
	require.NoError(t, err)
	pod, err := env.WaitJobPod(ctx, ns, "counter", 3*time.Minute)
	require.NoError(t, err)
	_, err = env.WaitCount(ctx, ns, pod.Name, 5, 2*time.Minute)
	require.NoError(t, err)
	follow := env.Follow(ctx, ns, pod.Name)

	evicted := make(chan error, 1)
	t0 := time.Now()
	go func() { _, err := env.Evict(ctx, ns, pod.Name); evicted <- err }()
	// Kill the node's agent once its dump is under way.
	time.Sleep(700 * time.Millisecond)
	agents, err := env.Client.CoreV1().Pods(harness.StasisNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=stasis-agent"})
	require.NoError(t, err)
	zero := int64(0)
	for _, a := range agents.Items {
		if a.Spec.NodeName == pod.Spec.NodeName {
			require.NoError(t, env.Client.CoreV1().Pods(harness.StasisNamespace).Delete(ctx, a.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}))
		}
	}
	require.NoError(t, <-evicted, "the eviction goes through once the new agent has a complete checkpoint")
	t.Logf("eviction allowed %s after it began, the agent killed 0.7 s into the dump", time.Since(t0).Round(100*time.Millisecond))
	before, err := follow.Wait(time.Minute)
	require.NoError(t, err)
	next, err := env.WaitJobPod(ctx, ns, "counter", 3*time.Minute, pod)
	require.NoError(t, err)
	after, err := env.WaitCount(ctx, ns, next.Name, 0, 2*time.Minute)
	require.NoError(t, err)
	continues(t, before, after)
}
