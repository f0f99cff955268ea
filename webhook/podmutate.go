package webhook

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/slok/kubewebhook/v2/pkg/model"
	"github.com/slok/kubewebhook/v2/pkg/webhook/mutating"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	klabels "k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/stasis-k8s/stasis/labels"
	"github.com/stasis-k8s/stasis/webhook/catalog"
	"github.com/stasis-k8s/stasis/webhook/wire"
	"github.com/stasis-k8s/stasis/wiring"
)

// mutatePod is CREATE pods (objectSelector: the mode label). It validates the labels, decides the
// identity and the storage, and wires the pod; with a complete checkpoint for the identity it also
// adds the restore. A refusal is a denial naming the label and the problem.
func (w *Webhook) mutatePod(ctx context.Context, ar *model.AdmissionReview, obj metav1.Object) (*mutating.MutatorResult, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return &mutating.MutatorResult{}, nil
	}
	before := pod.DeepCopy()
	if v := w.wirePod(ctx, ar, pod); v != nil {
		setVerdict(ctx, *v)
		return &mutating.MutatorResult{}, nil
	}
	if equality.Semantic.DeepEqual(before, pod) {
		setVerdict(ctx, verdict{Allowed: true, Unchanged: true})
		return &mutating.MutatorResult{}, nil
	}
	return &mutating.MutatorResult{MutatedObject: pod}, nil
}

func refuse(format string, a ...any) *verdict {
	v := deny(http.StatusBadRequest, metav1.StatusReasonBadRequest, "stasis: "+format, a...)
	return &v
}

// wirePod mutates pod in place; a non-nil verdict refuses the pod.
func (w *Webhook) wirePod(ctx context.Context, ar *model.AdmissionReview, pod *corev1.Pod) *verdict {
	ns := pod.Namespace
	if ns == "" {
		ns = ar.Namespace
	}
	if pod.Annotations[wiring.AnnotationWired] == "true" && pod.Annotations[wiring.AnnotationIdentity] != "" {
		// Reinvocation (or a pod copied from a wired one): wiring is done, and the identity
		// claim must not be taken twice.
		return nil
	}
	cfg, err := labels.ParsePod(w.cfg.LabelPrefix, pod)
	if err != nil {
		w.podEvent(ns, pod, corev1.EventTypeWarning, ReasonRefused, "pod refused: %v", err)
		return refuse("%v", err)
	}
	if !cfg.Enabled {
		return nil
	}
	id, err := w.resolveIdentity(ctx, ns, pod)
	if err != nil {
		w.podEvent(ns, pod, corev1.EventTypeWarning, ReasonRefused, "pod refused: %v", err)
		var ue *unsupportedError
		if errors.As(err, &ue) {
			return refuse("%v", err)
		}
		v := deny(http.StatusInternalServerError, metav1.StatusReasonInternalError, "stasis: %v", err)
		return &v
	}

	in := wire.Input{Config: cfg, ToolsImage: w.cfg.ToolsImage, Identity: id.Key}
	var rec *catalog.Record
	var pvc *corev1.PersistentVolumeClaim
	switch {
	case cfg.StorageVolume != "":
		claim, err := checkpointPVC(pod, cfg)
		if err != nil {
			return refuse("%s: %v (the checkpoint record is kept on the PVC)", cfg.Key(labels.StorageVolume), err)
		}
		in.CheckpointVolume = cfg.StorageVolume
		if id.ClaimBase != "" {
			res, err := w.store.Claim(ctx, w.claimRequest(ns, id, claim, pod, cfg, ar.DryRun))
			if err != nil {
				return w.internal(ns, pod, err)
			}
			in.Identity, rec = res.Identity, res.Record
			in.Annotations = map[string]string{catalog.AnnotationClaim: res.Token}
		} else if rec, err = w.store.Lookup(ctx, ns, claim, id.Key); err != nil {
			return w.internal(ns, pod, err)
		}
	case id.Owner == nil:
		return refuse("%s: required for a pod without a controller: name a persistentVolumeClaim volume of the pod that holds its checkpoints (Stasis creates PVCs only for Jobs, StatefulSets, Deployments and ReplicaSets)",
			cfg.Key(labels.StorageVolume))
	default:
		in.CheckpointVolume = wiring.CheckpointVolume
		if id.ClaimBase != "" {
			res, err := w.store.Claim(ctx, w.claimRequest(ns, id, "", pod, cfg, ar.DryRun))
			if err != nil {
				return w.internal(ns, pod, err)
			}
			in.Identity, rec, in.PVCName = res.Identity, res.Record, res.PVC
			in.Annotations = map[string]string{catalog.AnnotationClaim: res.Token}
			break
		}
		in.PVCName = catalog.PVCName(id.Key)
		pvc, err = w.d.Client.CoreV1().PersistentVolumeClaims(ns).Get(ctx, in.PVCName, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			if !ar.DryRun {
				spec := w.pvcSpec(ns, id.Key, id.Owner, pod, cfg)
				if _, err := w.store.EnsurePVC(ctx, spec); err != nil {
					return w.internal(ns, pod, err)
				}
				w.podEvent(ns, pod, corev1.EventTypeNormal, ReasonWired, "created checkpoint PVC %s (%s) for %s", spec.Name, spec.Size.String(), id.What)
			}
		case err != nil:
			return w.internal(ns, pod, fmt.Errorf("reading checkpoint PVC %s/%s: %w", ns, in.PVCName, err))
		default:
			if o := foreignOwner(pvc, id.Owner); o != nil {
				return refuse("checkpoint PVC %s/%s belongs to an earlier %s %s (uid %s); wait until it is garbage-collected",
					ns, pvc.Name, o.Kind, o.Name, o.UID)
			}
			rec, _ = catalog.RecordOf(pvc, id.Key)
		}
	}

	if rec != nil {
		in.Restore = &wire.Restore{
			Ref: wiring.RestoreRef{ID: rec.ID, Node: rec.Node, Time: rec.Time.UTC().Format(time.RFC3339), Size: rec.Size},
			IDs: map[string]string{},
		}
		for _, c := range cfg.Containers {
			if cid := rec.Containers[c.Name]; cid != "" {
				in.Restore.IDs[c.Name] = cid
			}
		}
		if len(in.Restore.IDs) == 0 {
			in.Restore = nil
		}
	}
	wire.Pod(pod, in)
	if in.Restore != nil {
		w.metrics.wired.WithLabelValues("true").Inc()
		w.podEvent(ns, pod, corev1.EventTypeNormal, ReasonRestoring, "restoring %s (containers %v) from checkpoint %s taken on node %s at %s (%s)",
			in.Identity, wire.RestoredContainers(in.Restore), rec.ID, rec.Node, in.Restore.Ref.Time, humanBytes(rec.Size))
	} else {
		w.metrics.wired.WithLabelValues("false").Inc()
		w.podEvent(ns, pod, corev1.EventTypeNormal, ReasonWired, "wired for checkpointing as %s (containers %v); no checkpoint to restore", in.Identity, cfg.Names())
	}
	return nil
}

func (w *Webhook) internal(ns string, pod *corev1.Pod, err error) *verdict {
	w.podEvent(ns, pod, corev1.EventTypeWarning, ReasonRefused, "pod refused: %v", err)
	v := deny(http.StatusInternalServerError, metav1.StatusReasonInternalError, "stasis: %v", err)
	return &v
}

func (w *Webhook) pvcSpec(ns, identity string, owner *metav1.OwnerReference, pod *corev1.Pod, cfg *labels.Config) catalog.PVCSpec {
	return catalog.PVCSpec{
		Namespace: ns, Name: catalog.PVCName(identity), Identity: identity,
		Size:         cfg.VolumeSizeFor(&pod.Spec, w.cfg.DefaultVolumeSize),
		StorageClass: cfg.StorageClass, Owner: owner,
	}
}

func (w *Webhook) claimRequest(ns string, id identity, shared string, pod *corev1.Pod, cfg *labels.Config, dryRun bool) catalog.ClaimRequest {
	return catalog.ClaimRequest{
		Namespace: ns, Base: id.ClaimBase, SharedPVC: shared,
		NewPVC:  func(identity string) catalog.PVCSpec { return w.pvcSpec(ns, identity, id.Owner, pod, cfg) },
		Holders: claimHolders{w: w}, Grace: w.cfg.ClaimGrace, DryRun: dryRun,
	}
}

// podEvent records an Event about a pod being created. Controller-created pods have no name yet
// (generateName), so their Events go to the controller.
func (w *Webhook) podEvent(ns string, pod *corev1.Pod, typ, reason, format string, a ...any) {
	var obj runtime.Object
	if pod.Name != "" {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: pod.Name, Namespace: ns, UID: pod.UID}}
		p.SetGroupVersionKind(corev1.SchemeGroupVersion.WithKind("Pod"))
		obj = p
	} else if ref := metav1.GetControllerOf(pod); ref != nil {
		obj = &metav1.PartialObjectMetadata{
			TypeMeta:   metav1.TypeMeta{APIVersion: ref.APIVersion, Kind: ref.Kind},
			ObjectMeta: metav1.ObjectMeta{Name: ref.Name, Namespace: ns, UID: ref.UID},
		}
	} else {
		return
	}
	w.d.Events.Eventf(obj, typ, reason, format, a...)
}

func everything() klabels.Selector { return klabels.Everything() }

// foreignOwner returns the owner of a Stasis-created PVC when it is not the pod's controller: a
// Job or StatefulSet deleted and re-created under the same name must not restore the old one's
// checkpoints.
func foreignOwner(pvc *corev1.PersistentVolumeClaim, owner *metav1.OwnerReference) *metav1.OwnerReference {
	for i := range pvc.OwnerReferences {
		if pvc.OwnerReferences[i].UID == owner.UID {
			return nil
		}
	}
	if len(pvc.OwnerReferences) == 0 {
		return nil
	}
	return &pvc.OwnerReferences[0]
}
