//go:build integration

package integration

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/kubernetes"
)

const (
	modeLabel    = "memverge.ai/checkpoint-mode"
	storageLabel = "memverge.ai/checkpoint-storage-volume"
	// nodeGroupLabel pins a scenario's pods (including Job pods the scheduler places) to the
	// scenario's own Nodes.
	nodeGroupLabel = "integration.stasis.dev/scenario"
)

// scenario is one test's namespace and Nodes (served by the kubelet simulation).
type scenario struct {
	t     *testing.T
	ctx   context.Context
	ns    string
	nodes []string
	c     kubernetes.Interface
}

// newScenario creates namespace ns and the given Nodes (named ns-<suffix>), and removes them when
// the test ends. Failing tests print the webhook's log tail.
func newScenario(t *testing.T, ns string, nodeSuffixes ...string) *scenario {
	t.Helper()
	require.NotNil(t, env, "integration environment not set up (TestMain)")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	s := &scenario{t: t, ctx: ctx, ns: ns, c: env.cluster.Client()}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("last lines of %s:\n%s", env.webhook.logPath, tail(env.webhook.logPath, 40))
			if f := env.cluster.Failed(); f != "" {
				t.Log(f)
			}
		}
		c2, cancel2 := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel2()
		_ = s.c.CoreV1().Namespaces().Delete(c2, ns, metav1.DeleteOptions{})
		for _, n := range s.nodes {
			env.kubelet.removeNode(c2, n)
		}
		cancel()
	})
	_, err := s.c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	require.NoError(t, err, "create namespace %s", ns)
	for _, suffix := range nodeSuffixes {
		name := ns + "-" + suffix
		require.NoError(t, env.kubelet.addNode(ctx, name, map[string]string{nodeGroupLabel: ns}))
		s.nodes = append(s.nodes, name)
	}
	// Pods need the namespace's default ServiceAccount, which the controller-manager creates.
	s.eventually("default ServiceAccount in "+ns, func() (bool, error) {
		_, err := s.c.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, nil
	})
	return s
}

// eventually polls cond every 100 ms until it holds; the scenario's context bounds it (a hang is
// a failure, not a timing assertion).
func (s *scenario) eventually(what string, cond func() (bool, error)) {
	s.t.Helper()
	var lastErr error
	for {
		ok, err := cond()
		if ok {
			return
		}
		if err != nil {
			lastErr = err
		}
		select {
		case <-s.ctx.Done():
			s.t.Fatalf("gave up waiting for %s (last error: %v)", what, lastErr)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// podOpts shape a test pod.
type podOpts struct {
	node      string            // spec.nodeName: bound directly, no scheduler
	labels    map[string]string // pod labels
	pvc       string            // mount this PVC as volume "checkpointing"
	noCommand bool              // leave command empty (entrypoint from the image)
}

func enabled(extra ...string) map[string]string {
	l := map[string]string{modeLabel: "true"}
	for i := 0; i+1 < len(extra); i += 2 {
		l[extra[i]] = extra[i+1]
	}
	return l
}

func (s *scenario) podObject(name string, o podOpts) *corev1.Pod {
	grace := int64(30)
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: s.ns, Labels: o.labels},
		Spec: corev1.PodSpec{
			NodeName:                      o.node,
			TerminationGracePeriodSeconds: &grace,
			RestartPolicy:                 corev1.RestartPolicyNever,
			Containers: []corev1.Container{{
				Name: "app", Image: "counter:integration", ImagePullPolicy: corev1.PullNever,
				Resources: corev1.ResourceRequirements{Limits: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("256Mi")}},
			}},
		},
	}
	if !o.noCommand {
		p.Spec.Containers[0].Command = []string{"/counter", "--interval=1s"}
	}
	if o.pvc != "" {
		p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: "checkpointing",
			VolumeSource: corev1.VolumeSource{PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: o.pvc}}})
	}
	return p
}

// createPod creates a pod and, when it is bound to a node, waits until the simulated kubelet
// reports it Running.
func (s *scenario) createPod(name string, o podOpts) *corev1.Pod {
	s.t.Helper()
	p, err := s.c.CoreV1().Pods(s.ns).Create(s.ctx, s.podObject(name, o), metav1.CreateOptions{})
	require.NoError(s.t, err, "create pod %s/%s", s.ns, name)
	if o.node != "" {
		return s.waitRunning(name)
	}
	return p
}

func (s *scenario) waitRunning(name string) *corev1.Pod {
	s.t.Helper()
	var p *corev1.Pod
	s.eventually("pod "+s.ns+"/"+name+" Running", func() (bool, error) {
		var err error
		p, err = s.c.CoreV1().Pods(s.ns).Get(s.ctx, name, metav1.GetOptions{})
		return err == nil && p.Status.Phase == corev1.PodRunning, err
	})
	return p
}

func (s *scenario) createPVC(name string) {
	s.t.Helper()
	sc := "integration-none" // nothing provisions it here: the PVC stays Pending, which is all the webhook needs
	_, err := s.c.CoreV1().PersistentVolumeClaims(s.ns).Create(s.ctx, &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes:      []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			StorageClassName: &sc,
			Resources:        corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("2Gi")}},
		},
	}, metav1.CreateOptions{})
	require.NoError(s.t, err, "create PVC %s", name)
}

// evict posts one Eviction (policy/v1) for a pod, as kubectl drain does, and returns the error.
func (s *scenario) evict(name string, dryRun bool) error {
	ev := &policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: s.ns}}
	if dryRun {
		ev.DeleteOptions = &metav1.DeleteOptions{DryRun: []string{metav1.DryRunAll}}
	}
	return s.c.CoreV1().Pods(s.ns).EvictV1(s.ctx, ev)
}

// podGone reports whether no pod with this name and UID exists any more.
func (s *scenario) waitGone(name string, uid string) {
	s.t.Helper()
	s.eventually("pod "+s.ns+"/"+name+" deleted", func() (bool, error) {
		p, err := s.c.CoreV1().Pods(s.ns).Get(s.ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true, nil
		}
		return err == nil && string(p.UID) != uid, err
	})
}

// events returns the Events about one object, as `kubectl describe` shows them.
func (s *scenario) events(kind, name string) []corev1.Event {
	s.t.Helper()
	sel := fields.Set{"involvedObject.kind": kind, "involvedObject.name": name}.AsSelector().String()
	l, err := s.c.CoreV1().Events(s.ns).List(s.ctx, metav1.ListOptions{FieldSelector: sel})
	require.NoError(s.t, err)
	return l.Items
}

// waitEvent waits for an Event about the object whose message contains every given fragment.
func (s *scenario) waitEvent(kind, name string, fragments ...string) corev1.Event {
	s.t.Helper()
	var found corev1.Event
	s.eventually(fmt.Sprintf("an Event on %s %s containing %q", kind, name, fragments), func() (bool, error) {
		for _, e := range s.events(kind, name) {
			ok := true
			for _, f := range fragments {
				ok = ok && strings.Contains(strings.ToLower(e.Message), strings.ToLower(f))
			}
			if ok {
				found = e
				return true, nil
			}
		}
		return false, nil
	})
	return found
}

// kubectl runs kubectl against the cluster with the scenario's context.
func (s *scenario) kubectl(args ...string) (string, error) {
	return env.kubectl(s.ctx, args...)
}

func (s *scenario) job(name string) *batchv1.Job {
	s.t.Helper()
	j, err := s.c.BatchV1().Jobs(s.ns).Get(s.ctx, name, metav1.GetOptions{})
	require.NoError(s.t, err)
	return j
}

// activePods lists the Job's pods that are not terminating.
func (s *scenario) jobPods(job string) []corev1.Pod {
	s.t.Helper()
	l, err := s.c.CoreV1().Pods(s.ns).List(s.ctx, metav1.ListOptions{LabelSelector: "batch.kubernetes.io/job-name=" + job})
	require.NoError(s.t, err)
	var out []corev1.Pod
	for _, p := range l.Items {
		if p.DeletionTimestamp == nil {
			out = append(out, p)
		}
	}
	return out
}

// reviews is the webhook's review counter for this scenario's namespace ("" id = all webhooks).
func (s *scenario) reviews(id string) int {
	s.t.Helper()
	n, err := env.webhook.reviews(s.ns, id)
	require.NoError(s.t, err)
	return n
}

// metric sums the webhook's samples of one metric whose labels match the given key/value pairs.
func (s *scenario) metric(name string, kv ...string) int {
	s.t.Helper()
	text, err := env.webhook.metrics()
	require.NoError(s.t, err)
	want := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		want[kv[i]] = kv[i+1]
	}
	return sumSamples(text, regexp.QuoteMeta(name), want)
}
