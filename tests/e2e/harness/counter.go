package harness

import (
	"bufio"
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
)

// CounterLine is one numbered line of the counter app (hack/testimages/counter): its number and its
// fields (mem=, file=).
type CounterLine struct {
	N      int
	Fields map[string]string
}

// CounterOutput is what the counter app printed.
type CounterOutput struct {
	Lines []CounterLine
	// FreshStarts counts "start pid=… token=…" lines: a restored process prints none.
	FreshStarts int
	// StartedAt holds, for each fresh start, the index in Lines of its first number.
	StartedAt []int
	// Done is true once the app printed "done" (it reached --to).
	Done bool
	// Text is the whole output.
	Text string
}

// First and Last are the first and last numbers printed (-1 when none).
func (o CounterOutput) First() int {
	if len(o.Lines) == 0 {
		return -1
	}
	return o.Lines[0].N
}

func (o CounterOutput) Last() int {
	if len(o.Lines) == 0 {
		return -1
	}
	return o.Lines[len(o.Lines)-1].N
}

// ParseCounter parses the counter app's output.
func ParseCounter(out string) CounterOutput {
	o := CounterOutput{Text: out}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "start":
			o.FreshStarts++
			o.StartedAt = append(o.StartedAt, len(o.Lines))
			continue
		case "done":
			o.Done = true
			continue
		}
		n, err := strconv.Atoi(f[0])
		if err != nil {
			continue
		}
		l := CounterLine{N: n, Fields: map[string]string{}}
		for _, kv := range f[1:] {
			if k, v, ok := strings.Cut(kv, "="); ok {
				l.Fields[k] = v
			}
		}
		o.Lines = append(o.Lines, l)
	}
	return o
}

// CounterContainer is the container name of every counter workload.
const CounterContainer = "counter"

// CounterSpec describes a counter workload.
type CounterSpec struct {
	Name string
	// Args are the counter's flags (--to, --interval, --touch-mib, --file).
	Args []string
	// FromImage leaves the container's command unset: the image's entrypoint runs (with Args).
	FromImage bool
	// Checkpoint sets memverge.ai/checkpoint-mode: 'true'; Labels are added as well.
	Checkpoint  bool
	Labels      map[string]string
	Annotations map[string]string
	Env         []corev1.EnvVar
	// NodeName pins the pod to a node (nodeSelector on the hostname label).
	NodeName string
	// MemoryRequest, when set, is the container's memory request and limit.
	MemoryRequest string
	// CPURequest, when set, is the container's CPU request (no limit): what the scheduler counts.
	CPURequest string
	// Volumes are added to the pod (e.g. a user-provided checkpoint PVC).
	Volumes []corev1.Volume
	// Indexed makes the Job an Indexed one (one completion): its pod's identity is its index.
	Indexed bool
	// GraceSeconds is the pod's terminationGracePeriodSeconds (0: 10).
	GraceSeconds int64
	// BackoffLimit of the Job (0 by default: any failure counted fails the Job).
	BackoffLimit int32
	// SecurityContext is the counter container's (nil: the runtime's defaults).
	SecurityContext *corev1.SecurityContext
	// Image replaces the counter's image (default Env.CounterImage).
	Image string
	// VolumeMounts are the counter container's; Sidecars are added beside it.
	VolumeMounts []corev1.VolumeMount
	Sidecars     []corev1.Container
}

func (e *Env) podTemplate(s CounterSpec) corev1.PodTemplateSpec {
	lbl := map[string]string{"app": s.Name}
	if s.Checkpoint {
		lbl["memverge.ai/checkpoint-mode"] = "true"
	}
	for k, v := range s.Labels {
		lbl[k] = v
	}
	c := corev1.Container{
		Name:            CounterContainer,
		Image:           e.CounterImage,
		ImagePullPolicy: corev1.PullIfNotPresent,
		Args:            s.Args,
		Env:             s.Env,
		SecurityContext: s.SecurityContext,
		VolumeMounts:    s.VolumeMounts,
	}
	if s.Image != "" {
		c.Image = s.Image
	}
	if !s.FromImage {
		c.Command = []string{"/counter"}
	}
	if s.MemoryRequest != "" {
		q := resource.MustParse(s.MemoryRequest)
		c.Resources = corev1.ResourceRequirements{
			Requests: corev1.ResourceList{corev1.ResourceMemory: q},
			Limits:   corev1.ResourceList{corev1.ResourceMemory: q},
		}
	}
	if s.CPURequest != "" {
		if c.Resources.Requests == nil {
			c.Resources.Requests = corev1.ResourceList{}
		}
		c.Resources.Requests[corev1.ResourceCPU] = resource.MustParse(s.CPURequest)
	}
	grace := int64(10)
	if s.GraceSeconds > 0 {
		grace = s.GraceSeconds
	}
	spec := corev1.PodSpec{
		Containers:                    append([]corev1.Container{c}, s.Sidecars...),
		RestartPolicy:                 corev1.RestartPolicyNever,
		TerminationGracePeriodSeconds: &grace,
		Volumes:                       s.Volumes,
	}
	if s.NodeName != "" {
		spec.NodeSelector = map[string]string{"kubernetes.io/hostname": s.NodeName}
	}
	return corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: lbl, Annotations: s.Annotations}, Spec: spec}
}

// CreateCounterJob creates a Job of one counter pod with backoffLimit 0: any failure counted
// against it fails the Job.
func (e *Env) CreateCounterJob(ctx context.Context, ns string, s CounterSpec) (*batchv1.Job, error) {
	backoff := s.BackoffLimit
	job := &batchv1.Job{
		ObjectMeta: metav1.ObjectMeta{Name: s.Name},
		Spec: batchv1.JobSpec{
			BackoffLimit: &backoff,
			Template:     e.podTemplate(s),
		},
	}
	if s.Indexed {
		mode, one := batchv1.IndexedCompletion, int32(1)
		job.Spec.CompletionMode, job.Spec.Completions = &mode, &one
	}
	return e.Client.BatchV1().Jobs(ns).Create(ctx, job, metav1.CreateOptions{})
}

// CreateCounterPod creates a plain counter pod; volumes are added to its spec.
func (e *Env) CreateCounterPod(ctx context.Context, ns string, s CounterSpec, volumes ...corev1.Volume) (*corev1.Pod, error) {
	t := e.podTemplate(s)
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: s.Name, Labels: t.Labels, Annotations: t.Annotations}, Spec: t.Spec}
	pod.Spec.Volumes = append(pod.Spec.Volumes, volumes...)
	return e.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
}

// CreateCounterDeployment creates a one-replica Deployment of the counter (restartPolicy Always).
func (e *Env) CreateCounterDeployment(ctx context.Context, ns string, s CounterSpec) (*appsv1.Deployment, error) {
	t := e.podTemplate(s)
	t.Spec.RestartPolicy = corev1.RestartPolicyAlways
	one := int32(1)
	d := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: s.Name},
		Spec: appsv1.DeploymentSpec{Replicas: &one, Template: t,
			Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": s.Name}}},
	}
	return e.Client.AppsV1().Deployments(ns).Create(ctx, d, metav1.CreateOptions{})
}

// WaitJobPod waits for a Ready pod of the Job other than the pods in exclude (by UID).
func (e *Env) WaitJobPod(ctx context.Context, ns, job string, timeout time.Duration, exclude ...*corev1.Pod) (*corev1.Pod, error) {
	return e.WaitPodWithLabel(ctx, ns, "batch.kubernetes.io/job-name="+job, timeout, exclude...)
}

// WaitPodWithLabel waits for a Ready pod matching selector other than the pods in exclude.
func (e *Env) WaitPodWithLabel(ctx context.Context, ns, selector string, timeout time.Duration, exclude ...*corev1.Pod) (*corev1.Pod, error) {
	var found *corev1.Pod
	var last string
	err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		pods, err := e.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
		if err != nil {
			last = err.Error()
			return false, nil
		}
		last = fmt.Sprintf("%d pods", len(pods.Items))
	next:
		for i := range pods.Items {
			p := &pods.Items[i]
			for _, x := range exclude {
				if x != nil && x.UID == p.UID {
					continue next
				}
			}
			last = p.Name + ": " + PodStatus(p)
			if p.DeletionTimestamp == nil && PodReady(p) {
				found = p
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		return nil, fmt.Errorf("no new Ready pod %s in %s after %s: %s%s", selector, ns, timeout, last, e.events(ctx, ns))
	}
	return found, nil
}

// WaitPodReady waits until the named pod is Ready.
func (e *Env) WaitPodReady(ctx context.Context, ns, name string, timeout time.Duration) (*corev1.Pod, error) {
	var pod *corev1.Pod
	err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		p, err := e.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		pod = p
		return p.DeletionTimestamp == nil && PodReady(p), nil
	})
	if err != nil {
		return nil, fmt.Errorf("pod %s/%s not Ready after %s: %s%s", ns, name, timeout, PodStatus(pod), e.events(ctx, ns))
	}
	return pod, nil
}

// WaitJobComplete waits for the Job's Complete (or Failed) condition and returns the Job.
func (e *Env) WaitJobComplete(ctx context.Context, ns, name string, timeout time.Duration) (*batchv1.Job, error) {
	var job *batchv1.Job
	err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		j, err := e.Client.BatchV1().Jobs(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		job = j
		for _, c := range j.Status.Conditions {
			if (c.Type == batchv1.JobComplete || c.Type == batchv1.JobFailed) && c.Status == corev1.ConditionTrue {
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		return job, fmt.Errorf("Job %s/%s did not finish within %s%s", ns, name, timeout, e.events(ctx, ns))
	}
	return job, nil
}

// JobSucceeded reports whether a finished Job completed.
func JobSucceeded(j *batchv1.Job) bool {
	for _, c := range j.Status.Conditions {
		if c.Type == batchv1.JobComplete && c.Status == corev1.ConditionTrue {
			return true
		}
	}
	return false
}

// PodReady reports the pod's Ready condition.
func PodReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// Logs returns the counter's output so far: the pod's only app container (init containers aside).
func (e *Env) Logs(ctx context.Context, ns, pod string) (CounterOutput, error) {
	raw, err := e.Client.CoreV1().Pods(ns).GetLogs(pod, e.logOptions(ctx, ns, pod, false)).DoRaw(ctx)
	if err != nil {
		return CounterOutput{}, err
	}
	return ParseCounter(string(raw)), nil
}

// logOptions reads the counter container of a pod with sidecars (a pod of one container needs no
// name: the documentation's examples name theirs as they like).
func (e *Env) logOptions(ctx context.Context, ns, pod string, follow bool) *corev1.PodLogOptions {
	o := &corev1.PodLogOptions{Follow: follow}
	if p, err := e.Client.CoreV1().Pods(ns).Get(ctx, pod, metav1.GetOptions{}); err == nil && len(p.Spec.Containers) > 1 {
		o.Container = CounterContainer
	}
	return o
}

// WaitCount waits until the pod's counter printed at least n.
func (e *Env) WaitCount(ctx context.Context, ns, pod string, n int, timeout time.Duration) (CounterOutput, error) {
	var out CounterOutput
	var lastErr error
	err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		o, err := e.Logs(ctx, ns, pod)
		if err != nil {
			lastErr = err
			return false, nil
		}
		out = o
		return o.Last() >= n || o.Done, nil
	})
	if err != nil {
		return out, fmt.Errorf("counter of %s/%s did not reach %d within %s (last %d, last error: %v)", ns, pod, n, timeout, out.Last(), lastErr)
	}
	return out, nil
}

// Follower collects a container's whole output while it runs, so that the last lines of a pod that
// is about to be deleted are not lost.
type Follower struct {
	mu   sync.Mutex
	buf  strings.Builder
	done chan struct{}
	err  error
}

// Follow streams the counter container's log from its start until it ends.
func (e *Env) Follow(ctx context.Context, ns, pod string) *Follower {
	f := &Follower{done: make(chan struct{})}
	go func() {
		defer close(f.done)
		s, err := e.Client.CoreV1().Pods(ns).GetLogs(pod, e.logOptions(ctx, ns, pod, true)).Stream(ctx)
		if err != nil {
			f.err = err
			return
		}
		defer s.Close()
		sc := bufio.NewScanner(s)
		for sc.Scan() {
			f.mu.Lock()
			f.buf.WriteString(sc.Text() + "\n")
			f.mu.Unlock()
		}
		f.err = sc.Err()
	}()
	return f
}

// Output is what was collected so far.
func (f *Follower) Output() CounterOutput {
	f.mu.Lock()
	defer f.mu.Unlock()
	return ParseCounter(f.buf.String())
}

// Wait waits until the stream ended (the container stopped) or timeout, and returns the output.
func (f *Follower) Wait(timeout time.Duration) (CounterOutput, error) {
	select {
	case <-f.done:
		return f.Output(), f.err
	case <-time.After(timeout):
		return f.Output(), fmt.Errorf("log stream still open after %s", timeout)
	}
}

// events lists the namespace's Events, for error messages.
func (e *Env) events(ctx context.Context, ns string) string {
	evs, err := e.Client.CoreV1().Events(ns).List(ctx, metav1.ListOptions{})
	if err != nil || len(evs.Items) == 0 {
		return ""
	}
	var b strings.Builder
	b.WriteString("\nEvents:")
	for _, ev := range evs.Items {
		fmt.Fprintf(&b, "\n  %s %s/%s %s: %s", ev.Type, ev.InvolvedObject.Kind, ev.InvolvedObject.Name, ev.Reason, ev.Message)
	}
	return b.String()
}

// Events returns the messages of the namespace's Events with the given reason.
func (e *Env) Events(ctx context.Context, ns, reason string) ([]string, error) {
	evs, err := e.Client.CoreV1().Events(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	var msgs []string
	for _, ev := range evs.Items {
		if ev.Reason == reason {
			msgs = append(msgs, ev.InvolvedObject.Name+": "+ev.Message)
		}
	}
	return msgs, nil
}

// DeleteJob deletes a Job with its pods.
func (e *Env) DeleteJob(ctx context.Context, ns, name string) error {
	bg := metav1.DeletePropagationBackground
	err := e.Client.BatchV1().Jobs(ns).Delete(ctx, name, metav1.DeleteOptions{PropagationPolicy: &bg})
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}
