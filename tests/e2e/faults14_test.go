//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/stasis-k8s/stasis/tests/e2e/harness"
	"github.com/stasis-k8s/stasis/wiring"
)

// More of the fault suite (issue 14): a webhook replica killed mid-drain, a NotReady node, an OOM
// kill after a restore, a sidecar injected by a second mutating webhook. Each asserts on the app's
// own output and on the pod, and logs the answer the user saw and the time to recover.

// A webhook replica is stopped while it holds an eviction review of `kubectl drain` (the pod's
// dump takes seconds; the replica with the review in flight is found from its metrics):
//   - Graceful (a rollout, its node drained: SIGTERM): the review in flight is answered, the
//     replica serves on for --shutdown-delay while the API server still sends it reviews, and the
//     drain completes without an error;
//   - Killed (SIGKILL, force-deleted): the review in flight is lost. The API server answers that
//     eviction 500 ("failed calling webhook"), on which kubectl drain gives up; run again, the
//     drain completes (the retry joins the dump the agent kept running, keyed by pod UID).
//
// Either way the replacement continues from the checkpoint.
func TestFaultWebhookReplicaKilledMidDrain(t *testing.T) {
	for _, kill := range []bool{false, true} {
		t.Run(map[bool]string{false: "Graceful", true: "Killed"}[kill], func(t *testing.T) {
			webhookStoppedMidDrain(t, kill)
		})
	}
}

func webhookStoppedMidDrain(t *testing.T, kill bool) {
	ctx := context.Background()
	ns := newNamespace(t, "whkill")
	// Incompressible memory: the dump writes all 2 GiB, so the eviction review is in flight for
	// seconds (a pattern heap dumps in about 1 s).
	_, err := env.CreateCounterJob(ctx, ns, harness.CounterSpec{Name: "whkill", Checkpoint: true, Indexed: true,
		Args: []string{"--interval=300ms", "--touch-mib=2048", "--touch-random"}})
	require.NoError(t, err)
	pod, err := env.WaitJobPod(ctx, ns, "whkill", 3*time.Minute)
	require.NoError(t, err)
	_, err = env.WaitCount(ctx, ns, pod.Name, 5, 2*time.Minute)
	require.NoError(t, err)
	follow := env.Follow(ctx, ns, pod.Name)
	t.Cleanup(func() { _ = env.Uncordon(context.Background(), pod.Spec.NodeName) })
	t.Cleanup(func() { waitWebhookAvailable(t) })
	waitWebhookAvailable(t)

	type result struct {
		took time.Duration
		out  string
		err  error
	}
	drain := func() chan result {
		c := make(chan result, 1)
		go func() {
			took, out, err := env.Drain(ctx, pod.Spec.NodeName, "app=whkill", 4*time.Minute)
			c <- result{took, out, err}
		}()
		return c
	}
	t0 := time.Now()
	drained := drain()
	serving := replicaWithEviction(t, 30*time.Second)
	var grace *int64
	if kill {
		grace = ptr(int64(0))
	}
	require.NoError(t, env.Client.CoreV1().Pods(harness.StasisNamespace).Delete(ctx, serving, metav1.DeleteOptions{GracePeriodSeconds: grace}))
	stoppedAt := time.Now()
	t.Logf("webhook replica %s (an eviction review in flight) deleted %s after the drain began (kill: %v)", serving, stoppedAt.Sub(t0).Round(100*time.Millisecond), kill)

	r := <-drained
	t.Logf("kubectl drain took %s, err %v:\n%s", r.took.Round(100*time.Millisecond), r.err, r.out)
	if kill && r.err != nil {
		assert.Contains(t, r.out, "webhook", "the lost review is a webhook call failure")
		waitWebhookAvailable(t)
		r = <-drain()
		t.Logf("kubectl drain run again took %s:\n%s", r.took.Round(100*time.Millisecond), r.out)
	}
	require.NoError(t, r.err, "the drain completes")
	drainedAt := time.Now()
	before, err := follow.Wait(time.Minute)
	require.NoError(t, err)
	next, err := env.WaitJobPod(ctx, ns, "whkill", 3*time.Minute, pod)
	require.NoError(t, err)
	after, err := env.WaitCount(ctx, ns, next.Name, 0, 2*time.Minute)
	require.NoError(t, err)
	continues(t, before, after)
	t.Logf("drain done %s after the replica was stopped; replacement %s continued at %d, %s after the stop",
		drainedAt.Sub(stoppedAt).Round(100*time.Millisecond), next.Name, after.First(), time.Since(stoppedAt).Round(100*time.Millisecond))
}

// replicaWithEviction finds the webhook replica with an eviction review in flight, from its own
// metrics (stasis_webhook_reviews_in_flight, on the health port).
func replicaWithEviction(t *testing.T, timeout time.Duration) string {
	var found string
	client := &http.Client{Timeout: time.Second}
	err := wait.PollUntilContextTimeout(context.Background(), 50*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		pods, err := env.Client.CoreV1().Pods(harness.StasisNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=stasis-webhook"})
		if err != nil {
			return false, nil
		}
		for _, p := range pods.Items {
			if p.Status.PodIP == "" || p.DeletionTimestamp != nil {
				continue
			}
			resp, err := client.Get("http://" + net.JoinHostPort(p.Status.PodIP, "8080") + "/metrics")
			if err != nil {
				continue
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if strings.Contains(string(b), `stasis_webhook_reviews_in_flight{webhook="eviction"} 1`) {
				found = p.Name
				return true, nil
			}
		}
		return false, nil
	})
	require.NoError(t, err, "no webhook replica with an eviction review in flight")
	return found
}

// waitWebhookAvailable waits until both webhook replicas are ready again (later tests need them).
func waitWebhookAvailable(t *testing.T) {
	err := wait.PollUntilContextTimeout(context.Background(), time.Second, 3*time.Minute, true, func(ctx context.Context) (bool, error) {
		d, err := env.Client.AppsV1().Deployments(harness.StasisNamespace).Get(ctx, "stasis-webhook", metav1.GetOptions{})
		return err == nil && d.Status.ReadyReplicas == 2 && d.Status.UpdatedReplicas == 2 && d.Status.Replicas == 2, nil
	})
	assert.NoError(t, err, "the webhook Deployment is back to two ready replicas")
}

// The node of a pod goes NotReady (its kubelet frozen: containers, containerd and the agent run
// on, but nothing manages them). An eviction of the pod is answered at once, allowed with a
// CheckpointNodeNotReady Event (the node cannot be checkpointed), instead of 429s and then 403
// after --agent-retry-for. The replacement on the other node continues from the last periodic
// checkpoint. The kubelet is resumed afterwards: the node is Ready again for later tests.
func TestFaultNodeNotReady(t *testing.T) {
	ctx := context.Background()
	require.NotNil(t, env.Local, "needs the local cluster (it stops a kubelet)")
	ns := newNamespace(t, "notready")
	_, err := env.CreateCounterDeployment(ctx, ns, harness.CounterSpec{Name: "counter", Checkpoint: true,
		Labels: map[string]string{"memverge.ai/checkpoint-interval": "10s"}, Args: []string{"--interval=300ms"}})
	require.NoError(t, err)
	pod, err := env.WaitPodWithLabel(ctx, ns, "app=counter", 2*time.Minute)
	require.NoError(t, err)
	require.NoError(t, wait.PollUntilContextTimeout(ctx, time.Second, 2*time.Minute, true, func(ctx context.Context) (bool, error) {
		m, err := env.LatestManifest(ctx, pod)
		return err == nil && m != nil, nil
	}), "a periodic checkpoint of the running pod")

	before, err := env.Logs(ctx, ns, pod.Name) // while its kubelet still serves them
	require.NoError(t, err)
	node := pod.Spec.NodeName
	kubelet := kubeletPID(t, node)
	require.NoError(t, syscall.Kill(kubelet, syscall.SIGSTOP))
	stopped := time.Now()
	t.Cleanup(func() { resumeKubelet(t, node, kubelet) })
	require.NoError(t, wait.PollUntilContextTimeout(ctx, time.Second, 3*time.Minute, true, func(ctx context.Context) (bool, error) {
		n, err := env.Client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		return err == nil && !nodeReady(n), nil
	}), "node %s NotReady", node)
	t.Logf("node %s NotReady %s after its kubelet was stopped", node, time.Since(stopped).Round(time.Second))

	t0 := time.Now()
	err = env.Client.PolicyV1().Evictions(ns).Evict(ctx, &policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Name: pod.Name, Namespace: ns}})
	answered := time.Since(t0)
	require.NoError(t, err, "the eviction is allowed")
	t.Logf("eviction of %s on the NotReady node answered in %s", pod.Name, answered.Round(time.Millisecond))
	assert.Less(t, answered, 10*time.Second, "answered at once, not held")
	ev := waitEvent(t, ns, pod.Name, "evicted without checkpoint")
	assert.Contains(t, ev, "node "+node+" is NotReady")

	next, err := env.WaitPodWithLabel(ctx, ns, "app=counter", 3*time.Minute, pod)
	require.NoError(t, err)
	after, err := env.WaitCount(ctx, ns, next.Name, 3, 2*time.Minute)
	require.NoError(t, err)
	t.Logf("replacement %s on %s printed %d first, %s after the eviction (the app had printed %d before the kubelet stopped)",
		next.Name, next.Spec.NodeName, after.First(), time.Since(t0).Round(time.Second), before.Last())
	assert.NotEqual(t, node, next.Spec.NodeName)
	assert.Zero(t, after.FreshStarts, "continued from the periodic checkpoint, not started afresh")
	assert.Greater(t, after.First(), 0)
}

// kubeletPID is the PID of a local node's kubelet (hack/node/node.sh writes it).
func kubeletPID(t *testing.T, node string) int {
	b, err := os.ReadFile(filepath.Join(env.Dir, "nodes", node, "pids", "kubelet.pid"))
	require.NoError(t, err)
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	require.NoError(t, err)
	comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	require.NoError(t, err)
	require.Equal(t, "kubelet", strings.TrimSpace(string(comm)), "pid %d", pid)
	return pid
}

func resumeKubelet(t *testing.T, node string, pid int) {
	assert.NoError(t, syscall.Kill(pid, syscall.SIGCONT))
	err := wait.PollUntilContextTimeout(context.Background(), time.Second, 3*time.Minute, true, func(ctx context.Context) (bool, error) {
		n, err := env.Client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		return err == nil && nodeReady(n) && len(n.Spec.Taints) == 0, nil
	})
	assert.NoError(t, err, "node %s Ready again after its kubelet resumed", node)
}

func nodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// A restored app is OOM-killed (it allocates past its memory limit once it runs on after the
// restore): the kubelet restarts the container in place, the app starts fresh (the restore plan
// was for the pod's first start, and it is consumed), and it runs on: no crash loop of restores.
func TestFaultOOMAfterRestore(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t, "oom")
	const oomAt = 50
	_, err := env.CreateCounterDeployment(ctx, ns, harness.CounterSpec{Name: "counter", Checkpoint: true, MemoryRequest: "128Mi",
		Args: []string{"--interval=300ms", fmt.Sprintf("--oom-at=%d:%s/oom-marker", oomAt, wiring.CheckpointMount)}})
	require.NoError(t, err)
	pod, err := env.WaitPodWithLabel(ctx, ns, "app=counter", 2*time.Minute)
	require.NoError(t, err)
	_, err = env.WaitCount(ctx, ns, pod.Name, 5, time.Minute)
	require.NoError(t, err)
	follow := env.Follow(ctx, ns, pod.Name)
	_, err = env.Evict(ctx, ns, pod.Name)
	require.NoError(t, err)
	before, err := follow.Wait(time.Minute)
	require.NoError(t, err)
	require.Less(t, before.Last(), oomAt, "checkpointed before the allocation")

	next, err := env.WaitPodWithLabel(ctx, ns, "app=counter", 2*time.Minute, pod)
	require.NoError(t, err)
	var restarted *corev1.Pod
	require.NoError(t, wait.PollUntilContextTimeout(ctx, time.Second, 3*time.Minute, true, func(ctx context.Context) (bool, error) {
		p, err := env.Client.CoreV1().Pods(ns).Get(ctx, next.Name, metav1.GetOptions{})
		if err != nil || len(p.Status.ContainerStatuses) == 0 {
			return false, nil
		}
		restarted = p
		cs := counterStatus(p)
		return cs != nil && cs.RestartCount >= 1 && cs.State.Running != nil, nil
	}), "the restored container OOM-killed and restarted in place")
	oomed := time.Now()
	cs := counterStatus(restarted)
	require.NotNil(t, cs.LastTerminationState.Terminated)
	t.Logf("restored container ended: %s, exit %d", cs.LastTerminationState.Terminated.Reason, cs.LastTerminationState.Terminated.ExitCode)
	assert.NotZero(t, cs.LastTerminationState.Terminated.ExitCode)

	prev, err := previousLogs(ctx, ns, next.Name, harness.CounterContainer)
	require.NoError(t, err)
	continues(t, before, prev)
	assert.Equal(t, oomAt, prev.Last(), "the restored app ran on to the allocation")

	now, err := env.WaitCount(ctx, ns, next.Name, oomAt+5, 2*time.Minute)
	require.NoError(t, err)
	assert.Equal(t, 1, now.FreshStarts, "after the kill the app starts fresh, not from the checkpoint again")
	assert.Equal(t, 0, now.First())
	p, err := env.Client.CoreV1().Pods(ns).Get(ctx, next.Name, metav1.GetOptions{})
	require.NoError(t, err)
	assert.EqualValues(t, 1, counterStatus(p).RestartCount, "no crash loop")
	t.Logf("OOM kill of the restored app: restarted in place and counting again (fresh) at %d, %s after the restart was seen", now.Last(), time.Since(oomed).Round(time.Second))
}

func counterStatus(p *corev1.Pod) *corev1.ContainerStatus {
	for i := range p.Status.ContainerStatuses {
		if p.Status.ContainerStatuses[i].Name == harness.CounterContainer {
			return &p.Status.ContainerStatuses[i]
		}
	}
	return nil
}

func previousLogs(ctx context.Context, ns, pod, container string) (harness.CounterOutput, error) {
	b, err := env.Client.CoreV1().Pods(ns).GetLogs(pod, &corev1.PodLogOptions{Container: container, Previous: true}).DoRaw(ctx)
	if err != nil {
		return harness.CounterOutput{}, err
	}
	return harness.ParseCounter(string(b)), nil
}

// A second mutating webhook (a secrets agent's, say) injects a sidecar after Stasis wired the pod;
// the API server reinvokes Stasis (reinvocationPolicy IfNeeded). Two cases:
//   - the labels do not select the sidecar (checkpoint-containers: counter): it is not wrapped and
//     never dumped; after an eviction the app continues and the sidecar starts fresh;
//   - the labels select it (the default: every container but known proxies): the reinvocation wraps
//     it like the others, it is part of the creation-time set, and both continue.
//
// Either way the set dumped is the set wrapped at creation, and the app continues.
func TestFaultSidecarFromSecondWebhook(t *testing.T) {
	for _, selected := range []bool{false, true} {
		t.Run(map[bool]string{false: "NotSelected", true: "SelectedByDefault"}[selected], func(t *testing.T) {
			sidecarCase(t, selected)
		})
	}
}

func sidecarCase(t *testing.T, selected bool) {
	ctx := context.Background()
	ns := newNamespace(t, "sidecar")
	startSidecarInjector(t, ns)
	lbl := map[string]string{"e2e-sidecar": "inject"}
	if !selected {
		lbl["memverge.ai/checkpoint-containers"] = harness.CounterContainer
	}
	_, err := env.CreateCounterJob(ctx, ns, harness.CounterSpec{Name: "counter", Checkpoint: true, Indexed: true,
		Labels: lbl, Args: []string{"--interval=300ms"}})
	require.NoError(t, err)
	pod, err := env.WaitJobPod(ctx, ns, "counter", 2*time.Minute)
	require.NoError(t, err)
	side := containerOf(pod, injectedName)
	require.NotNil(t, side, "the second webhook injected its sidecar")
	t.Logf("injected sidecar command %q; stasis.dev/checkpoint %s", side.Command, pod.Annotations[wiring.AnnotationCheckpoint])
	assert.Equal(t, selected, side.Command[0] != injectedCommand, "wrapped in Stasis' launcher only when selected")
	assert.Equal(t, selected, strings.Contains(pod.Annotations[wiring.AnnotationCheckpoint], `"`+injectedName+`"`), "in the set Stasis dumps only when selected")
	_, err = env.WaitCount(ctx, ns, pod.Name, 5, time.Minute)
	require.NoError(t, err)
	_, err = containerLogs(ctx, ns, pod.Name, injectedName, 3, time.Minute)
	require.NoError(t, err)
	follow := env.Follow(ctx, ns, pod.Name)
	took, err := env.Evict(ctx, ns, pod.Name)
	require.NoError(t, err)
	before, err := follow.Wait(time.Minute)
	require.NoError(t, err)

	next, err := env.WaitJobPod(ctx, ns, "counter", 2*time.Minute, pod)
	require.NoError(t, err)
	require.NotNil(t, containerOf(next, injectedName), "injected into the replacement too")
	after, err := env.WaitCount(ctx, ns, next.Name, 0, 2*time.Minute)
	require.NoError(t, err)
	continues(t, before, after)
	sideOut, err := containerLogs(ctx, ns, next.Name, injectedName, 2, time.Minute)
	require.NoError(t, err)
	dir, err := env.CheckpointDir(ctx, next)
	require.NoError(t, err)
	found, err := filepath.Glob(filepath.Join(dir, "*", injectedName))
	require.NoError(t, err)
	if selected {
		assert.Zero(t, sideOut.FreshStarts, "the wrapped sidecar was dumped and continues")
		assert.NotEmpty(t, found, "a checkpoint directory of the sidecar")
	} else {
		assert.Equal(t, 1, sideOut.FreshStarts, "the sidecar starts fresh: it was not dumped")
		assert.Equal(t, 0, sideOut.First())
		assert.Empty(t, found, "no checkpoint directory of the sidecar")
	}
	t.Logf("evicted in %s with the injected sidecar; replacement continued at %d; its sidecar printed %d first (fresh starts %d)",
		took.Round(100*time.Millisecond), after.First(), sideOut.First(), sideOut.FreshStarts)
}

func containerOf(p *corev1.Pod, name string) *corev1.Container {
	for i := range p.Spec.Containers {
		if p.Spec.Containers[i].Name == name {
			return &p.Spec.Containers[i]
		}
	}
	return nil
}

// containerLogs waits until the named container printed n numbers.
func containerLogs(ctx context.Context, ns, pod, container string, n int, timeout time.Duration) (harness.CounterOutput, error) {
	var out harness.CounterOutput
	err := wait.PollUntilContextTimeout(ctx, 500*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		b, err := env.Client.CoreV1().Pods(ns).GetLogs(pod, &corev1.PodLogOptions{Container: container}).DoRaw(ctx)
		if err != nil {
			return false, nil
		}
		out = harness.ParseCounter(string(b))
		return len(out.Lines) >= n, nil
	})
	return out, err
}

// The checkpoint volume is full (a 160 MiB tmpfs behind a static PV, filled from the node): the
// eviction's dump fails cleanly with 403 and a CheckpointFailed Event naming the full volume, the
// app runs on, the previous checkpoint stays complete, and the next pod restores it.
func TestFaultCheckpointVolumeFull(t *testing.T) {
	ctx := context.Background()
	require.NotNil(t, env.Local, "needs the local cluster (it mounts a tmpfs in a node)")
	ns := newNamespace(t, "full")
	node := env.Local.Nodes[0].Name
	claim, dir := staticVolume(t, ns)
	inNode(t, node, "mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", dir)
	t.Cleanup(func() { _, _ = inNodeOut(node, "umount", "-l", dir) })
	spec := harness.CounterSpec{Name: "counter", NodeName: node, Args: []string{"--interval=300ms", "--touch-mib=48"}}

	pod := plainCounter(t, ns, spec, claim)
	_, err := env.WaitCount(ctx, ns, pod.Name, 5, 2*time.Minute)
	require.NoError(t, err)
	_, err = env.Evict(ctx, ns, pod.Name) // the previous checkpoint
	require.NoError(t, err)
	pod = plainCounter(t, ns, spec, claim)
	restored, err := env.WaitCount(ctx, ns, pod.Name, 3, 2*time.Minute)
	require.NoError(t, err)
	require.Zero(t, restored.FreshStarts, "restored from the eviction's checkpoint")
	before := inNode(t, node, "sh", "-c", "cd "+dir+" && find . -name COMPLETE | sort")
	require.NotEmpty(t, strings.TrimSpace(before), "a complete checkpoint on the volume")

	// Fill the volume but one page: too little even for a dump that shares every unchanged chunk
	// with the previous checkpoint (its manifest alone is tens of KiB).
	inNode(t, node, "sh", "-c", "fallocate -l $(( $(df -B1 --output=avail "+dir+" | tail -1) - 4096 )) "+dir+"/filler")
	t0 := time.Now()
	err = env.Client.PolicyV1().Evictions(ns).Evict(ctx, &policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Name: pod.Name, Namespace: ns}})
	for err != nil && strings.Contains(err.Error(), "in progress") && time.Since(t0) < 2*time.Minute {
		time.Sleep(2 * time.Second)
		err = env.Client.PolicyV1().Evictions(ns).Evict(ctx, &policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Name: pod.Name, Namespace: ns}})
	}
	require.Error(t, err, "the eviction is refused (fail-closed)")
	t.Logf("eviction with a full volume answered after %s: %v", time.Since(t0).Round(100*time.Millisecond), err)
	refused := time.Now()
	assert.Contains(t, err.Error(), "is full")
	// The webhook's Event (the agent posts its own too, and either may come first).
	ev := waitEvent(t, ns, pod.Name, "checkpoint of pod "+ns+"/"+pod.Name+" failed")
	assert.Contains(t, ev, "is full")
	out, err := env.Logs(ctx, ns, pod.Name)
	require.NoError(t, err)
	again, err := env.WaitCount(ctx, ns, pod.Name, out.Last()+2, time.Minute)
	require.NoError(t, err)
	assert.Zero(t, again.FreshStarts, "the app runs on after the failed dump")
	thawed := time.Since(refused)
	after := inNode(t, node, "sh", "-c", "cd "+dir+" && find . -name COMPLETE | sort")
	assert.Equal(t, before, after, "the previous checkpoint is untouched, nothing partial is complete")
	partial := inNode(t, node, "sh", "-c", "cd "+dir+" && find . -maxdepth 3 -name '.tmp-*'")
	assert.Empty(t, strings.TrimSpace(partial), "nothing partial left")

	// The pod is deleted (its termination dump fails the same way) and created again: it
	// restores the previous checkpoint.
	_, err = env.Run(ctx, "-n", ns, "delete", "pod", pod.Name)
	require.NoError(t, err)
	pod = plainCounter(t, ns, spec, claim)
	last, err := env.WaitCount(ctx, ns, pod.Name, 3, 2*time.Minute)
	require.NoError(t, err)
	assert.Zero(t, last.FreshStarts, "restored, not started afresh")
	assert.Equal(t, restored.First(), last.First(), "from the previous checkpoint, intact")
	t.Logf("full volume: the app ran on %s after the refused eviction; the next pod restored the previous checkpoint at %d", thawed.Round(100*time.Millisecond), last.First())
}

// inNode runs a command in a local node's mount namespace (where its kubelet mounts volumes).
func inNode(t *testing.T, node string, args ...string) string {
	out, err := inNodeOut(node, args...)
	require.NoError(t, err, "%v: %s", args, out)
	return out
}

func inNodeOut(node string, args ...string) (string, error) {
	b, err := os.ReadFile(filepath.Join(env.Dir, "nodes", node, "pids", "holder.pid"))
	if err != nil {
		return "", err
	}
	out, err := exec.Command("nsenter", append([]string{"-t", strings.TrimSpace(string(b)), "-m", "--"}, args...)...).CombinedOutput()
	return string(out), err
}
