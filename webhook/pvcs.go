package webhook

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/util/wait"
	corev1listers "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"github.com/stasis-k8s/stasis/labels"
	"github.com/stasis-k8s/stasis/webhook/catalog"
	"github.com/stasis-k8s/stasis/webhook/inject"
	"github.com/stasis-k8s/stasis/wiring"
)

// ReasonPVCCreated is the Event on a pod whose checkpoint PVC the controller created.
const ReasonPVCCreated = "CheckpointPVCCreated"

// PVCController creates the checkpoint PVCs that wired pods name, once the pod exists. The pod
// webhook only names the PVC (catalog.PVCName of the identity): creating it during admission left
// one behind for every pod a later admission step rejected (Pod Security, quota, another webhook).
// Until the PVC exists the pod stays Pending (the scheduler and the kubelet wait for it and retry
// when it appears).
//
// Every replica of the webhook runs one: creation is by name, so two replicas creating the same
// PVC is one success and one AlreadyExists, and only the creator records the Event.
type PVCController struct {
	w     *Webhook
	pvcs  corev1listers.PersistentVolumeClaimLister
	queue workqueue.TypedRateLimitingInterface[string]
}

// NewPVCController builds the controller; pvcs lists the PVCs Stasis manages (catalog.LabelManaged),
// the pods come from the webhook's own pod lister.
func NewPVCController(w *Webhook, pvcs corev1listers.PersistentVolumeClaimLister) *PVCController {
	return &PVCController{w: w, pvcs: pvcs, queue: workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.DefaultTypedControllerRateLimiter[string](), workqueue.TypedRateLimitingQueueConfig[string]{Name: "stasis-pvcs"})}
}

// Handler is the pod informer's event handler: every added or changed pod is looked at.
func (c *PVCController) Handler() cache.ResourceEventHandler {
	enqueue := func(obj any) {
		if key, err := cache.MetaNamespaceKeyFunc(obj); err == nil {
			c.queue.Add(key)
		}
	}
	return cache.ResourceEventHandlerFuncs{AddFunc: enqueue, UpdateFunc: func(_, obj any) { enqueue(obj) }}
}

// Run works the queue until ctx ends.
func (c *PVCController) Run(ctx context.Context, workers int) {
	defer c.queue.ShutDown()
	for i := 0; i < workers; i++ {
		go wait.UntilWithContext(ctx, c.work, time.Second)
	}
	<-ctx.Done()
}

func (c *PVCController) work(ctx context.Context) {
	for {
		key, quit := c.queue.Get()
		if quit {
			return
		}
		err := c.Sync(ctx, key)
		switch {
		case err == nil:
			c.queue.Forget(key)
		case c.queue.NumRequeues(key) < 10:
			c.w.d.Log.Warn().Err(err).Str("pod", key).Msg("checkpoint PVC: retrying")
			c.queue.AddRateLimited(key)
		default:
			c.w.d.Log.Error().Err(err).Str("pod", key).Msg("checkpoint PVC: giving up")
			c.queue.Forget(key)
		}
		c.queue.Done(key)
	}
}

// Sync creates the checkpoint PVC the pod ns/name names, when it is missing.
func (c *PVCController) Sync(ctx context.Context, key string) error {
	ns, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return nil
	}
	pod, err := c.w.d.Pods.Pods(ns).Get(name)
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	if pod.DeletionTimestamp != nil || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		return nil
	}
	cfg, err := labels.ParsePod(c.w.cfg.LabelPrefix, pod)
	if err != nil || !cfg.Enabled {
		return nil // not wired (refused at admission)
	}
	if cfg.StorageVolume != "" {
		return c.syncSharedClaim(ctx, pod, cfg)
	}
	claimName := stasisClaim(pod)
	if claimName == "" {
		return nil
	}
	if _, err := c.pvcs.PersistentVolumeClaims(ns).Get(claimName); err == nil {
		return nil
	}
	spec, what, err := c.w.pvcFor(ctx, pod, cfg, claimName)
	var m *mismatchError
	if errors.As(err, &m) {
		c.w.d.Events.Eventf(pod, corev1.EventTypeWarning, ReasonRefused, "checkpoint PVC %s not created: %v", claimName, err)
		return nil // the pod's wiring does not match its identity: retrying changes nothing
	}
	if err != nil {
		return err
	}
	created, err := c.w.ctrl.store.EnsurePVC(ctx, spec)
	if err != nil {
		return err
	}
	if created {
		c.w.d.Events.Eventf(pod, corev1.EventTypeNormal, ReasonPVCCreated, "created checkpoint PVC %s (%s) for %s", spec.Name, spec.Size.String(), what)
	}
	return nil
}

// syncSharedClaim writes the claim of a NonIndexed Job pod on a new slot of the user's shared
// checkpoint PVC (admission wrote nothing for a new slot: catalog.Claim). Only while the pod is
// Pending: the claim is written once, right after the pod appears.
func (c *PVCController) syncSharedClaim(ctx context.Context, pod *corev1.Pod, cfg *labels.Config) error {
	token := pod.Annotations[catalog.AnnotationClaim]
	if token == "" || (pod.Status.Phase != "" && pod.Status.Phase != corev1.PodPending) {
		return nil
	}
	id, err := c.w.deriveIdentity(ctx, c.w.ctrl, pod.Namespace, pod, false)
	if err != nil || id.ClaimBase == "" {
		return nil
	}
	slot := inject.SpecIdentity(pod, cfg)
	pvc, perr := checkpointPVC(pod, cfg)
	if !strings.HasPrefix(slot, id.ClaimBase+"/") || perr != nil {
		return nil
	}
	err = c.w.ctrl.store.EnsureClaim(ctx, pod.Namespace, pvc, slot, token)
	if errors.Is(err, catalog.ErrClaimedByOther) {
		c.w.d.Events.Eventf(pod, corev1.EventTypeWarning, ReasonRefused, "checkpoint slot not claimed: %v", err)
		return nil
	}
	return err
}

// stasisClaim is the claim name of the pod's Stasis-created checkpoint volume, "" when it has none.
func stasisClaim(pod *corev1.Pod) string {
	for _, v := range pod.Spec.Volumes {
		if v.Name == wiring.CheckpointVolume && v.PersistentVolumeClaim != nil {
			return v.PersistentVolumeClaim.ClaimName
		}
	}
	return ""
}

// pvcFor is the PVC Stasis creates for an existing pod: identity re-derived and checked against
// the one in the pod's spec (as at eviction), and the claim name must be the one Stasis gives that
// identity — a pod that got past admission some other way gets no PVC it could not have had.
func (w *Webhook) pvcFor(ctx context.Context, pod *corev1.Pod, cfg *labels.Config, claimName string) (catalog.PVCSpec, string, error) {
	id, err := w.deriveIdentity(ctx, w.ctrl, pod.Namespace, pod, false)
	var ue *unsupportedError
	if errors.As(err, &ue) {
		return catalog.PVCSpec{}, "", &mismatchError{err}
	}
	if err != nil {
		return catalog.PVCSpec{}, "", err
	}
	if id.Owner == nil {
		return catalog.PVCSpec{}, "", mismatch("pod %s/%s has no controller to own a checkpoint PVC", pod.Namespace, pod.Name)
	}
	key, spec := id.Key, inject.SpecIdentity(pod, cfg)
	derived := id.Key
	if id.ClaimBase != "" {
		derived = "a slot of " + id.What
		if strings.HasPrefix(spec, id.ClaimBase+"/") {
			key = spec
		}
	}
	if key == "" || spec != key {
		return catalog.PVCSpec{}, "", mismatch("pod %s/%s was wired as %q, its owner gives %s", pod.Namespace, pod.Name, spec, derived)
	}
	if want := catalog.PVCName(key); claimName != want {
		return catalog.PVCSpec{}, "", mismatch("the pod names PVC %s, Stasis' PVC for %s is %s", claimName, key, want)
	}
	s := w.pvcSpec(pod.Namespace, key, id.Owner, pod, cfg)
	if id.ClaimBase != "" {
		// The slot's PVC was created by the claim; if it is gone, the new one carries the pod's
		// claim so that the pod's own checkpoint is recorded and found.
		claim, _ := json.Marshal(catalog.Claim{Token: pod.Annotations[catalog.AnnotationClaim], Time: w.d.Now().UTC()})
		s.Annotations = map[string]string{catalog.ClaimKey(key): string(claim)}
	}
	return s, id.What, nil
}

// mismatchError: a pod whose wiring is not what Stasis gives its identity; retrying cannot help.
type mismatchError struct{ err error }

func (e *mismatchError) Error() string { return e.err.Error() }

func mismatch(format string, a ...any) error { return &mismatchError{fmt.Errorf(format, a...)} }
