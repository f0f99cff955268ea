//go:build integration

package integration

import (
	"context"
	"fmt"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/retry"
)

// kubeletSim plays the kubelet's part for the Nodes the tests create — there is no kubelet in this
// tier. For every pod bound to one of those Nodes it reports the pod Running and Ready (init
// containers completed, containers running), and it finishes the deletion of a terminating pod at
// once (grace period 0), as a kubelet would after the containers stopped. Nothing runs.
type kubeletSim struct {
	client kubernetes.Interface
	stopCh chan struct{}
	queue  chan string

	mu    sync.Mutex
	nodes map[string]bool
	pause map[string]bool // namespace/name: leave this pod alone (tests that need a Pending pod)
}

func startKubeletSim(client kubernetes.Interface) (*kubeletSim, error) {
	k := &kubeletSim{client: client, stopCh: make(chan struct{}), queue: make(chan string, 4096),
		nodes: map[string]bool{}, pause: map[string]bool{}}
	f := informers.NewSharedInformerFactory(client, 0)
	inf := f.Core().V1().Pods().Informer()
	enqueue := func(obj any) {
		if p, ok := obj.(*corev1.Pod); ok && k.owns(p.Spec.NodeName) {
			k.queue <- p.Namespace + "/" + p.Name
		}
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    enqueue,
		UpdateFunc: func(_, obj any) { enqueue(obj) },
	}); err != nil {
		return nil, err
	}
	f.Start(k.stopCh)
	if !cache.WaitForCacheSync(k.stopCh, inf.HasSynced) {
		return nil, fmt.Errorf("kubelet simulation: pod informer did not sync")
	}
	for i := 0; i < 4; i++ {
		go k.work()
	}
	return k, nil
}

func (k *kubeletSim) stop() { close(k.stopCh) }

func (k *kubeletSim) owns(node string) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return node != "" && k.nodes[node]
}

func (k *kubeletSim) paused(key string) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.pause[key]
}

// addNode creates a Ready, schedulable Node served by the simulation, with labels for
// nodeSelectors. The not-ready taint the API server puts on every new Node is removed here (the
// node lifecycle controller, which would do it, is off: nothing sends heartbeats).
func (k *kubeletSim) addNode(ctx context.Context, name string, labels map[string]string) error {
	k.mu.Lock()
	k.nodes[name] = true
	k.mu.Unlock()
	l := map[string]string{"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}
	for key, v := range labels {
		l[key] = v
	}
	if _, err := k.client.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: l}}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create node %s: %w", name, err)
	}
	capacity := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("16"),
		corev1.ResourceMemory: resource.MustParse("64Gi"),
		corev1.ResourcePods:   resource.MustParse("110"),
	}
	// Controllers touch new Nodes too: re-read and retry on conflicts.
	nodes := k.client.CoreV1().Nodes()
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		n, err := nodes.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		now := metav1.Now()
		n.Status.Capacity, n.Status.Allocatable = capacity, capacity
		n.Status.Conditions = []corev1.NodeCondition{{
			Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
			Message: "simulated by the integration tests (no kubelet)", LastHeartbeatTime: now, LastTransitionTime: now,
		}}
		n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "127.0.0.1"}, {Type: corev1.NodeHostName, Address: name}}
		_, err = nodes.UpdateStatus(ctx, n, metav1.UpdateOptions{})
		return err
	}); err != nil {
		return fmt.Errorf("node %s status: %w", name, err)
	}
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		n, err := nodes.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		n.Spec.Taints = nil
		_, err = nodes.Update(ctx, n, metav1.UpdateOptions{})
		return err
	}); err != nil {
		return fmt.Errorf("node %s taints: %w", name, err)
	}
	return nil
}

// removeNode deletes the Node; its pods are the test namespace's business.
func (k *kubeletSim) removeNode(ctx context.Context, name string) {
	_ = k.client.CoreV1().Nodes().Delete(ctx, name, metav1.DeleteOptions{})
}

func (k *kubeletSim) work() {
	for {
		select {
		case <-k.stopCh:
			return
		case key := <-k.queue:
			if err := k.sync(key); err != nil {
				go func() {
					select {
					case <-k.stopCh:
					case <-time.After(200 * time.Millisecond):
						k.queue <- key
					}
				}()
			}
		}
	}
}

func (k *kubeletSim) sync(key string) error {
	if k.paused(key) {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ns, name, _ := cache.SplitMetaNamespaceKey(key)
	pods := k.client.CoreV1().Pods(ns)
	p, err := pods.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	if !k.owns(p.Spec.NodeName) {
		return nil
	}
	if p.DeletionTimestamp != nil {
		// The containers "stopped" (SIGTERM, exit 143): report the terminal phase, then finish
		// the deletion with grace period 0, in that order, like a kubelet does.
		if p.Status.Phase != corev1.PodFailed && p.Status.Phase != corev1.PodSucceeded {
			now := metav1.Now()
			p.Status.Phase = corev1.PodFailed
			for i := range p.Status.ContainerStatuses {
				cs := &p.Status.ContainerStatuses[i]
				var started metav1.Time
				if cs.State.Running != nil {
					started = cs.State.Running.StartedAt
				}
				cs.Ready = false
				cs.State = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
					ExitCode: 143, Reason: "Error", StartedAt: started, FinishedAt: now}}
			}
			for i := range p.Status.Conditions {
				if c := &p.Status.Conditions[i]; c.Type == corev1.PodReady || c.Type == corev1.ContainersReady {
					c.Status, c.LastTransitionTime = corev1.ConditionFalse, now
				}
			}
			if _, err := pods.UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
				if apierrors.IsNotFound(err) {
					return nil
				}
				return err
			}
		}
		zero := int64(0)
		err := pods.Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: &zero, Preconditions: &metav1.Preconditions{UID: &p.UID}})
		if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
			return nil
		}
		return err
	}
	if p.Status.Phase != "" && p.Status.Phase != corev1.PodPending {
		return nil
	}
	now := metav1.Now()
	p.Status.Phase = corev1.PodRunning
	p.Status.HostIP = "127.0.0.1"
	p.Status.HostIPs = []corev1.HostIP{{IP: "127.0.0.1"}}
	p.Status.PodIP = "127.0.0.1"
	p.Status.PodIPs = []corev1.PodIP{{IP: "127.0.0.1"}}
	p.Status.StartTime = &now
	p.Status.Conditions = nil
	for _, c := range []corev1.PodConditionType{corev1.PodScheduled, corev1.PodInitialized, corev1.ContainersReady, corev1.PodReady} {
		p.Status.Conditions = append(p.Status.Conditions, corev1.PodCondition{Type: c, Status: corev1.ConditionTrue, LastTransitionTime: now})
	}
	p.Status.InitContainerStatuses = nil
	for _, c := range p.Spec.InitContainers {
		p.Status.InitContainerStatuses = append(p.Status.InitContainerStatuses, corev1.ContainerStatus{
			Name: c.Name, Image: c.Image, ImageID: "sim://" + c.Image, ContainerID: "sim://" + string(p.UID) + "/" + c.Name, Ready: true,
			State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 0, Reason: "Completed", StartedAt: now, FinishedAt: now}},
		})
	}
	p.Status.ContainerStatuses = nil
	started := true
	for _, c := range p.Spec.Containers {
		p.Status.ContainerStatuses = append(p.Status.ContainerStatuses, corev1.ContainerStatus{
			Name: c.Name, Image: c.Image, ImageID: "sim://" + c.Image, ContainerID: "sim://" + string(p.UID) + "/" + c.Name,
			Ready: true, Started: &started,
			State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}},
		})
	}
	_, err = pods.UpdateStatus(ctx, p, metav1.UpdateOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}
