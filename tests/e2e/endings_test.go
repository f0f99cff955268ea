//go:build e2e

package e2e

// Every ending (issue 15) and the right incarnation (issue 14), on real nodes: scheduler
// preemption, the time from SIGTERM to the container's exit with and without Stasis, a Job
// re-created under the same name, a Deployment rolled to a new image.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	schedulingv1 "k8s.io/api/scheduling/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/stasis-k8s/stasis/agent"
	"github.com/stasis-k8s/stasis/tests/cluster"
	"github.com/stasis-k8s/stasis/tests/e2e/harness"
)

// freeCPU is a node's allocatable CPU (millicores) less the requests of the pods bound to it that
// have not finished, as the scheduler counts them (terminating pods included).
func freeCPU(t *testing.T, node string) int64 {
	t.Helper()
	ctx := context.Background()
	n, err := env.Client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	require.NoError(t, err)
	free := n.Status.Allocatable.Cpu().MilliValue()
	pods, err := env.Client.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + node})
	require.NoError(t, err)
	for _, p := range pods.Items {
		if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			continue
		}
		var sum, initMax int64
		for _, c := range p.Spec.Containers {
			sum += c.Resources.Requests.Cpu().MilliValue()
		}
		for _, c := range p.Spec.InitContainers {
			initMax = max(initMax, c.Resources.Requests.Cpu().MilliValue())
		}
		free -= max(sum, initMax)
	}
	return free
}

func nodeNames(t *testing.T) []string {
	t.Helper()
	nodes, err := env.Client.CoreV1().Nodes().List(context.Background(), metav1.ListOptions{})
	require.NoError(t, err)
	var names []string
	for _, n := range nodes.Items {
		names = append(names, n.Name)
	}
	sort.Strings(names)
	require.GreaterOrEqual(t, len(names), 2, "needs two nodes")
	return names
}

// disruption polls a pod until it carries the DisruptionTarget condition or is gone, and returns
// the condition's reason ("" when the pod went without it).
func disruption(ctx context.Context, ns, pod string) string {
	reason := ""
	_ = wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, 2*time.Minute, true, func(ctx context.Context) (bool, error) {
		p, err := env.Client.CoreV1().Pods(ns).Get(ctx, pod, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true, nil
		}
		if err != nil {
			return false, nil
		}
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.DisruptionTarget && c.Status == corev1.ConditionTrue {
				reason = c.Reason
				return true, nil
			}
		}
		return false, nil
	})
	return reason
}

// Issue 15, check 3: a higher-priority pod pinned to a full node preempts a checkpointed Job pod
// there. The scheduler deletes the victim (SIGTERM: checkpointed by the launcher), the Job's
// replacement runs on the other node and continues, and the preemption counts as no failure
// (backoffLimit 0: the webhook's podFailurePolicy ignores DisruptionTarget and exit 143).
//
// "Full" is made of CPU requests (both kubelets report the whole machine): the victim requests
// what is free on the smaller node less 100m, the preemptor as much, pinned to the victim's node,
// so it fits only without the victim, and the victim's replacement only on the other node.
func TestPreemptedJobPodContinues(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t, "preempt")
	nodes := nodeNames(t)
	a, b := nodes[0], nodes[1]
	fa, fb := freeCPU(t, a), freeCPU(t, b)
	x := min(fa, fb) - 100
	require.Greater(t, x, fa/2, "the victim must take more than half of %s's free CPU (%dm free on %s, %dm on %s)", a, fa, a, fb, b)
	cpu := fmt.Sprintf("%dm", x)

	// Created first: the Priority admission plugin reads PriorityClasses from an informer, so a
	// pod naming one created a moment ago can be refused ("no PriorityClass with name").
	pc, err := env.Client.SchedulingV1().PriorityClasses().Create(ctx, &schedulingv1.PriorityClass{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "stasis-e2e-high-"}, Value: 1000000,
		Description: "e2e: preempts a checkpointed Job pod"}, metav1.CreateOptions{})
	require.NoError(t, err)
	t.Cleanup(func() {
		_ = env.Client.SchedulingV1().PriorityClasses().Delete(context.Background(), pc.Name, metav1.DeleteOptions{})
	})
	// The victim on node a: b cordoned while it is scheduled.
	_, err = env.Run(ctx, "cordon", b)
	require.NoError(t, err)
	t.Cleanup(func() { _ = env.Uncordon(context.Background(), b) })
	_, err = env.CreateCounterJob(ctx, ns, harness.CounterSpec{Name: "victim", Checkpoint: true, CPURequest: cpu,
		Args: []string{"--interval=300ms", "--to=70"}})
	require.NoError(t, err)
	victim, err := env.WaitJobPod(ctx, ns, "victim", 2*time.Minute)
	require.NoError(t, err)
	require.Equal(t, a, victim.Spec.NodeName)
	require.NoError(t, env.Uncordon(ctx, b))
	follow := env.Follow(ctx, ns, victim.Name)
	_, err = env.WaitCount(ctx, ns, victim.Name, 8, time.Minute)
	require.NoError(t, err)

	grace := int64(1)
	preemptor := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "preemptor"},
		Spec: corev1.PodSpec{
			PriorityClassName: pc.Name, TerminationGracePeriodSeconds: &grace,
			NodeSelector: map[string]string{"kubernetes.io/hostname": a},
			Containers: []corev1.Container{{Name: "counter", Image: env.CounterImage, Command: []string{"/counter"},
				Args:      []string{"--interval=1s"},
				Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse(cpu)}}}},
		},
	}
	disrupted := make(chan string, 1)
	go func() { disrupted <- disruption(ctx, ns, victim.Name) }()
	t0 := time.Now()
	require.NoError(t, createWhenPriorityKnown(ctx, ns, preemptor))

	why := waitEvent(t, ns, victim.Name, "Preempted by")
	t.Logf("victim %s on %s (%s CPU requested; free: %s %dm, %s %dm): %s", victim.Name, a, cpu, a, fa, b, fb, why)
	assert.Equal(t, "PreemptionByScheduler", <-disrupted, "the scheduler marks the victim DisruptionTarget")
	before, err := follow.Wait(time.Minute)
	require.NoError(t, err)
	pre, err := env.WaitPodReady(ctx, ns, "preemptor", 2*time.Minute)
	require.NoError(t, err)
	assert.Equal(t, a, pre.Spec.NodeName)
	next, err := env.WaitJobPod(ctx, ns, "victim", 3*time.Minute, victim)
	require.NoError(t, err)
	after, err := env.WaitCount(ctx, ns, next.Name, 0, time.Minute)
	require.NoError(t, err)
	figures := fmt.Sprintf("preemption: victim printed %d last; replacement %s on %s printed %d first (fresh starts %d), %s after the preemptor was created",
		before.Last(), next.Name, next.Spec.NodeName, after.First(), after.FreshStarts, time.Since(t0).Round(10*time.Millisecond))
	t.Log(figures)
	logf("%s", figures)
	assert.Equal(t, b, next.Spec.NodeName, "the replacement fits only on the other node")
	continues(t, before, after)
	assert.GreaterOrEqual(t, after.First(), before.Last(), "the replacement's first number is at least the victim's last")

	job, err := env.WaitJobComplete(ctx, ns, "victim", 3*time.Minute)
	require.NoError(t, err)
	assert.True(t, harness.JobSucceeded(job), "Job must complete; status %+v", job.Status)
	assert.Zero(t, job.Status.Failed, "the preemption must not count against backoffLimit")
}

// exitTimes is when a pod's deletion began, when the runtime saw its counter container's process
// exit (containerd's /tasks/exit event, from the shim: precise) and when the pod status first
// showed the container terminated (what the kubelet reports, on its own schedule).
type exitTimes struct{ exited, reported time.Duration }

// taskExit follows the node's containerd events and sends the exit time of the container's init
// process.
func taskExit(ctx context.Context, t *testing.T, node, container string) <-chan time.Time {
	t.Helper()
	var sock string
	for _, nd := range env.Local.Nodes {
		if nd.Name == node {
			sock = nd.CRISocket()
		}
	}
	require.NotEmpty(t, sock, "node %s", node)
	cmd := exec.CommandContext(ctx, "ctr", "--address", sock, "-n", "k8s.io", "events")
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	out := make(chan time.Time, 1)
	go func() {
		defer func() { _ = cmd.Wait() }()
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			line := sc.Text()
			i := strings.Index(line, " /tasks/exit {")
			if i < 0 {
				continue
			}
			var ev struct {
				ContainerID string    `json:"container_id"`
				ID          string    `json:"id"`
				ExitedAt    time.Time `json:"exited_at"`
			}
			if json.Unmarshal([]byte(line[i+len(" /tasks/exit "):]), &ev) == nil && ev.ContainerID == container && ev.ID == container {
				out <- ev.ExitedAt
				return
			}
		}
	}()
	time.Sleep(300 * time.Millisecond) // ctr subscribed
	return out
}

// terminatedAfter deletes a running pod and measures, from the delete call, the exit of its
// counter container's process and the pod status that reports it.
func terminatedAfter(t *testing.T, ns, pod string) exitTimes {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	p, err := env.Client.CoreV1().Pods(ns).Get(ctx, pod, metav1.GetOptions{})
	require.NoError(t, err)
	var cid string
	for _, s := range p.Status.ContainerStatuses {
		if s.Name == harness.CounterContainer {
			cid = strings.TrimPrefix(s.ContainerID, "containerd://")
		}
	}
	require.NotEmpty(t, cid, "container ID of %s", pod)
	exited := taskExit(ctx, t, p.Spec.NodeName, cid)
	w, err := env.Client.CoreV1().Pods(ns).Watch(ctx, metav1.ListOptions{FieldSelector: "metadata.name=" + pod})
	require.NoError(t, err)
	defer w.Stop()
	var t0 atomic.Int64
	reported := make(chan time.Duration, 1)
	go func() {
		for ev := range w.ResultChan() {
			p, ok := ev.Object.(*corev1.Pod)
			if !ok || t0.Load() == 0 {
				continue
			}
			for _, s := range p.Status.ContainerStatuses {
				if s.Name == harness.CounterContainer && s.State.Terminated != nil {
					reported <- time.Since(time.Unix(0, t0.Load()))
					return
				}
			}
		}
	}()
	start := time.Now()
	t0.Store(start.UnixNano())
	require.NoError(t, env.Client.CoreV1().Pods(ns).Delete(ctx, pod, metav1.DeleteOptions{}))
	var r exitTimes
	for r.exited == 0 || r.reported == 0 {
		select {
		case at := <-exited:
			r.exited = at.Sub(start)
		case d := <-reported:
			r.reported = d
		case <-ctx.Done():
			t.Fatalf("pod %s/%s: exit %v, reported %v after the delete", ns, pod, r.exited, r.reported)
		}
	}
	return r
}

// Issue 15's note: the time from SIGTERM (the pod's deletion) to the container's exit, for the
// same app wired for checkpoints (the launcher checkpoints it on SIGTERM first) and unlabelled
// (the app exits on SIGTERM): the counter with a few MiB, and with 256 MiB touched. Three each;
// the exit as containerd saw it, and as the pod status reported it. Figures only: no assertion
// on time (the machine is shared), but each wired pod must have been checkpointed.
func TestSIGTERMToContainerExit(t *testing.T) {
	ctx := context.Background()
	require.NotNil(t, env.Local, "reads the nodes' containerd events")
	ns := newNamespace(t, "sigterm")
	pvc, _ := staticVolume(t, ns)
	const runs = 3
	for _, touch := range []int{0, 256} {
		var wired, plain []exitTimes
		args := []string{"--interval=300ms", fmt.Sprintf("--touch-mib=%d", touch)}
		for i := 1; i <= runs; i++ {
			spec := harness.CounterSpec{Name: fmt.Sprintf("wired-%d-%d", touch, i), Args: args}
			p := plainCounter(t, ns, spec, pvc)
			_, err := env.WaitCount(ctx, ns, p.Name, 3, time.Minute)
			require.NoError(t, err)
			wired = append(wired, terminatedAfter(t, ns, p.Name))
			require.NoError(t, env.WaitPodGone(ctx, ns, p.Name, time.Minute))
			m, err := env.LatestManifest(ctx, p)
			require.NoError(t, err)
			assert.Equal(t, agent.ReasonTermination, m.Reason, "the wired pod was checkpointed on SIGTERM")
			assert.Equal(t, "pod/"+ns+"/"+p.Name, m.Identity)

			spec = harness.CounterSpec{Name: fmt.Sprintf("plain-%d-%d", touch, i), Args: args}
			_, err = env.CreateCounterPod(ctx, ns, spec)
			require.NoError(t, err)
			_, err = env.WaitPodReady(ctx, ns, spec.Name, 2*time.Minute)
			require.NoError(t, err)
			_, err = env.WaitCount(ctx, ns, spec.Name, 3, time.Minute)
			require.NoError(t, err)
			plain = append(plain, terminatedAfter(t, ns, spec.Name))
			require.NoError(t, env.WaitPodGone(ctx, ns, spec.Name, time.Minute))
		}
		figures := fmt.Sprintf("SIGTERM (pod delete) to container exit, counter app with %d MiB touched: with Stasis (checkpoint on SIGTERM) %s; without %s",
			touch, exitFigures(wired), exitFigures(plain))
		t.Log(figures)
		logf("%s", figures)
	}
}

// exitFigures prints the runs and the mean of the exits and of the reports.
func exitFigures(rs []exitTimes) string {
	var ex, rep []string
	var sumEx, sumRep time.Duration
	for _, r := range rs {
		ex, rep = append(ex, r.exited.Round(time.Millisecond).String()), append(rep, r.reported.Round(time.Millisecond).String())
		sumEx, sumRep = sumEx+r.exited, sumRep+r.reported
	}
	n := time.Duration(len(rs))
	return fmt.Sprintf("exit %v mean %v (status %v mean %v)", ex, (sumEx / n).Round(time.Millisecond), rep, (sumRep / n).Round(time.Millisecond))
}

// Issue 14: a Job deleted and re-created under the same name, its checkpoints on a PVC the user
// provides (so they outlive the Job): the new Job's pod starts fresh, with an Event that says why
// (the checkpoint belongs to the earlier Job's incarnation), though the old checkpoint is there.
func TestJobRecreatedWithSameNameStartsFresh(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t, "recreate")
	pvc, dir := staticVolume(t, ns)
	spec := harness.CounterSpec{Name: "counter", Checkpoint: true, Indexed: true, Args: []string{"--interval=300ms"},
		Labels: map[string]string{storageVolumeLabel: ckptVolume},
		Volumes: []corev1.Volume{{Name: ckptVolume, VolumeSource: corev1.VolumeSource{
			PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: pvc}}}}}
	_, err := env.CreateCounterJob(ctx, ns, spec)
	require.NoError(t, err)
	old, err := env.WaitJobPod(ctx, ns, "counter", 2*time.Minute)
	require.NoError(t, err)
	follow := env.Follow(ctx, ns, old.Name)
	_, err = env.WaitCount(ctx, ns, old.Name, 8, time.Minute)
	require.NoError(t, err)

	out, err := env.Run(ctx, "-n", ns, "delete", "job", "counter")
	require.NoError(t, err, out)
	before, err := follow.Wait(time.Minute)
	require.NoError(t, err)
	require.NoError(t, env.WaitPodGone(ctx, ns, old.Name, 2*time.Minute))
	kept := completeCheckpoints(t, dir)
	require.NotEmpty(t, kept, "the deleted Job's pod was checkpointed on SIGTERM onto the user's PVC")
	t.Logf("old Job's pod printed %d last; checkpoints on the PVC: %v", before.Last(), kept)

	_, err = env.CreateCounterJob(ctx, ns, spec)
	require.NoError(t, err)
	fresh, err := env.WaitJobPod(ctx, ns, "counter", 2*time.Minute, old)
	require.NoError(t, err)
	after, err := env.WaitCount(ctx, ns, fresh.Name, 3, time.Minute)
	require.NoError(t, err)
	assert.Equal(t, 1, after.FreshStarts, "the re-created Job starts afresh")
	assert.Equal(t, 0, after.First(), "a fresh start counts from 0")
	why := waitEvent(t, ns, fresh.Name, "cold start")
	t.Logf("Event: %s", why)
	assert.Contains(t, why, "re-created under the same name")
}

// runningCopies polls the Deployment's pods until stop closes and returns the most pods seen
// running at once (phase Running with a running counter container, terminating ones included).
func runningCopies(ctx context.Context, ns string, stop <-chan struct{}) <-chan int {
	most := make(chan int, 1)
	go func() {
		n := 0
		defer func() { most <- n }()
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			pods, err := env.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=counter"})
			if err != nil {
				continue
			}
			running := 0
			for _, p := range pods.Items {
				for _, s := range p.Status.ContainerStatuses {
					if s.Name == harness.CounterContainer && s.State.Running != nil {
						running++
					}
				}
			}
			n = max(n, running)
		}
	}()
	return most
}

// Issue 14: a one-replica checkpointed Deployment. The webhook sets its strategy to Recreate (at
// creation, and again when a user sets RollingUpdate, with a warning kubectl prints). Rolled to a
// new image, then to a new template with the same image, no two copies ever run at once, and each
// new ReplicaSet's pod starts fresh with an Event that says why: the old pod's checkpoint (taken
// on its SIGTERM) belongs to another image, then to another ReplicaSet.
func TestDeploymentRolloutStartsFreshOneCopy(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t, "rollout")
	d, err := env.CreateCounterDeployment(ctx, ns, harness.CounterSpec{Name: "counter", Checkpoint: true, Args: []string{"--interval=300ms"}})
	require.NoError(t, err)
	assert.Equal(t, appsv1.RecreateDeploymentStrategyType, d.Spec.Strategy.Type, "the webhook sets Recreate at creation")
	out, err := env.Run(ctx, "-n", ns, "patch", "deployment/counter", "--type=merge", "-p", `{"spec":{"strategy":{"type":"RollingUpdate"}}}`)
	require.NoError(t, err, out)
	t.Logf("kubectl patch to RollingUpdate: %s", strings.TrimSpace(out))
	assert.Contains(t, out, "Warning: stasis: spec.strategy set to Recreate", "kubectl prints the webhook's warning")
	d, err = env.Client.AppsV1().Deployments(ns).Get(ctx, "counter", metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, appsv1.RecreateDeploymentStrategyType, d.Spec.Strategy.Type, "the webhook keeps Recreate on update")

	pod, err := env.WaitPodWithLabel(ctx, ns, "app=counter", 2*time.Minute)
	require.NoError(t, err)
	seen := []*corev1.Pod{pod}
	type roll struct {
		args []string
		why  string
	}
	for _, roll := range []roll{
		{[]string{"set", "image", "deployment/counter", "counter=" + cluster.CounterImageV2}, "was taken of image"},
		{[]string{"set", "env", "deployment/counter", "ROLLOUT=2"}, "a new rollout"},
	} {
		cur := seen[len(seen)-1]
		follow := env.Follow(ctx, ns, cur.Name)
		_, err = env.WaitCount(ctx, ns, cur.Name, 8, time.Minute)
		require.NoError(t, err)
		stop := make(chan struct{})
		most := runningCopies(ctx, ns, stop)
		out, err := env.Run(ctx, append([]string{"-n", ns}, roll.args...)...)
		require.NoError(t, err, out)
		before, err := follow.Wait(time.Minute)
		require.NoError(t, err)
		next, err := env.WaitPodWithLabel(ctx, ns, "app=counter", 2*time.Minute, seen...)
		require.NoError(t, err)
		after, err := env.WaitCount(ctx, ns, next.Name, 3, time.Minute)
		require.NoError(t, err)
		close(stop)
		assert.Equal(t, 1, <-most, "%s: never two copies running at once", roll.args[:2])
		m, err := env.LatestManifest(ctx, next)
		require.NoError(t, err)
		assert.Equal(t, agent.ReasonTermination, m.Reason, "the old pod was checkpointed on SIGTERM")
		assert.Equal(t, 1, after.FreshStarts, "%s: the new ReplicaSet's pod starts afresh", roll.args[:2])
		assert.Equal(t, 0, after.First())
		why := waitEvent(t, ns, next.Name, "cold start")
		t.Logf("%s: old pod printed %d last, new pod %s started at %d; Event: %s", roll.args[:2], before.Last(), next.Name, after.First(), why)
		assert.Contains(t, why, roll.why)
		seen = append(seen, next)
	}
}

// Issue 14: a one-replica Deployment's pod deleted with kubectl delete (1 GiB of incompressible
// memory touched, so its checkpoint on SIGTERM writes 1 GiB and takes a while). The ReplicaSet
// replaces it at once, without waiting for its end; the webhook holds the replacement's creation
// (429, retried by the controller, an Event on the ReplicaSet) until the old pod has ended: never
// two copies, and the replacement continues from the termination checkpoint, not an older one or
// none.
func TestDeploymentPodDeletedWaitsAndContinues(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t, "deldeploy")
	_, err := env.CreateCounterDeployment(ctx, ns, harness.CounterSpec{Name: "counter", Checkpoint: true, GraceSeconds: 30,
		MemoryRequest: "1536Mi", Args: []string{"--interval=300ms", "--touch-mib=1024", "--touch-random"}})
	require.NoError(t, err)
	pod, err := env.WaitPodWithLabel(ctx, ns, "app=counter", 3*time.Minute)
	require.NoError(t, err)
	follow := env.Follow(ctx, ns, pod.Name)
	_, err = env.WaitCount(ctx, ns, pod.Name, 8, 2*time.Minute)
	require.NoError(t, err)
	stop := make(chan struct{})
	most := runningCopies(ctx, ns, stop)
	t0 := time.Now()
	out, err := env.Run(ctx, "-n", ns, "delete", "pod", pod.Name, "--wait=false")
	require.NoError(t, err, out)
	before, err := follow.Wait(2 * time.Minute)
	require.NoError(t, err)
	next, err := env.WaitPodWithLabel(ctx, ns, "app=counter", 3*time.Minute, pod)
	require.NoError(t, err)
	after, err := env.WaitCount(ctx, ns, next.Name, 0, 2*time.Minute)
	require.NoError(t, err)
	close(stop)
	held, err := env.Events(ctx, ns, "WaitingForPreviousPod")
	require.NoError(t, err)
	t.Logf("deleted %s at %d; %s continued at %d, Ready %s after the delete; held %d times: %q",
		pod.Name, before.Last(), next.Name, after.First(), since(t0), len(held), firstOf(held))
	assert.Equal(t, 1, <-most, "never two copies running at once")
	assert.NotEmpty(t, held, "the replacement's creation was held while the old pod was checkpointed")
	continues(t, before, after)
}

func firstOf(s []string) []string {
	if len(s) > 1 {
		return s[:1]
	}
	return s
}

// createWhenPriorityKnown creates pod, retrying while the API server's Priority admission plugin
// has not yet seen the pod's PriorityClass in its informer cache.
func createWhenPriorityKnown(ctx context.Context, ns string, pod *corev1.Pod) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := env.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
		if err == nil || !strings.Contains(err.Error(), "no PriorityClass with name") || time.Now().After(deadline) {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
}
