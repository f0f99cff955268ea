package webhook

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/slok/kubewebhook/v2/pkg/model"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	klabels "k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/labels"
	"github.com/stasis-k8s/stasis/webhook/catalog"
	"github.com/stasis-k8s/stasis/webhook/inject"
	"github.com/stasis-k8s/stasis/wiring"
)

// mutatePod is CREATE pods (objectSelector: the mode label). It validates the labels, decides the
// identity and the storage, and wires the pod; with a complete checkpoint for the identity it also
// adds the restore. A refusal is a denial naming the label and the problem.
func (w *Webhook) mutatePod(ctx context.Context, rv *review) verdict {
	pod := rv.obj.(*corev1.Pod)
	before := pod.DeepCopy()
	if v := w.wirePod(ctx, &rv.AdmissionReview, pod); v != nil {
		return *v
	}
	patch, err := podPatch(before, pod)
	if err != nil {
		return deny(http.StatusInternalServerError, metav1.StatusReasonInternalError, "stasis: computing the patch: %v", err)
	}
	v := verdict{Allowed: true, Unchanged: patch == nil, Patch: patch}
	if !inject.Marked(before) { // the first invocation warns, not our reinvocation
		v.Warnings = w.warnGrace(rv.Namespace, before)
	}
	return v
}

// warnGrace warns (admission warning, which kubectl prints, and an Event) when the pod's grace
// period cannot fit a dump of its memory; see graceWarning.
func (w *Webhook) warnGrace(ns string, pod *corev1.Pod) []string {
	if pod.Namespace != "" {
		ns = pod.Namespace
	}
	cfg, err := labels.ParsePod(w.cfg.LabelPrefix, pod)
	if err != nil || !cfg.Enabled {
		return nil
	}
	msg := graceWarning(cfg, &pod.Spec, w.cfg.DumpSpeed, w.cfg.DumpOverhead)
	if msg == "" {
		return nil
	}
	w.podEvent(ns, pod, corev1.EventTypeWarning, ReasonGracePeriodShort, "%s", msg)
	return []string{"stasis: " + msg}
}

func refuse(format string, a ...any) *verdict {
	v := deny(http.StatusBadRequest, metav1.StatusReasonBadRequest, "stasis: "+format, a...)
	return &v
}

// wirePod mutates pod in place; a non-nil verdict refuses the pod.
//
// Nothing a pod says in Stasis' namespace (stasis.dev/* annotations, stasis-* volumes and
// containers, mounts under /stasis) is trusted: the identity is always re-derived and the wiring
// re-applied. An unmarked pod (no stasis.dev/* annotation) may set none of those fields. A marked
// pod must be exactly what Stasis produces for it: that is our own reinvocation (the API server
// calls us again after later webhooks; it must get the same pod back), a retried request, or a copy
// of a wired pod that happens to be current. Any difference refuses the pod, naming the field,
// except in what is decided anew at every invocation and written over whatever the pod holds (the
// restore decision, which follows the catalog's cache, and the checkpoint spec; see
// inject.Foreign). A copied or forged pod is refused rather than silently re-wired because Stasis
// cannot tell its own stale pieces (a wrapped command) from the user's, and because a mismatch is
// exactly what an attempt to take another identity or skip wiring looks like: it must fail loudly.
//
// Admission writes no object: a Stasis-created PVC is only named here and created by the PVC
// controller (pvcs.go) once the pod exists. The exception is a NonIndexed Job's claim (see slot).
func (w *Webhook) wirePod(ctx context.Context, ar *model.AdmissionReview, pod *corev1.Pod) *verdict {
	ns := pod.Namespace
	if ns == "" {
		ns = ar.Namespace
	}
	cfg, err := labels.ParsePod(w.cfg.LabelPrefix, pod)
	if err != nil {
		w.podEvent(ns, pod, corev1.EventTypeWarning, ReasonRefused, "pod refused: %v", err)
		return refuse("%v", err)
	}
	if !cfg.Enabled {
		return nil
	}
	if err := unrestorable(&pod.Spec); err != nil {
		w.podEvent(ns, pod, corev1.EventTypeWarning, ReasonRefused, "pod refused: %v", err)
		return refuse("%v", err)
	}
	marked := inject.Marked(pod)
	if !marked {
		if probs := inject.Reserved(pod); len(probs) > 0 {
			return w.refuseOwn(ns, pod, false, probs)
		}
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
	if !marked {
		if v := w.previousCopy(ns, pod, id); v != nil {
			return v
		}
	}
	in, rec, v := w.storage(ctx, ar, ns, pod, cfg, id, marked)
	if v != nil {
		return v
	}
	in.Restore = restoreOf(rec, cfg)
	if marked {
		want := pod.DeepCopy()
		inject.Strip(want)
		inject.Pod(want, in)
		if probs := inject.Foreign(pod, want); len(probs) > 0 {
			return w.refuseOwn(ns, pod, true, probs)
		}
	}
	inject.Pod(pod, in)
	if marked {
		return nil // wired, counted and reported by the first invocation
	}
	if in.Restore != nil {
		w.metrics.wired.WithLabelValues("true").Inc()
		w.podEvent(ns, pod, corev1.EventTypeNormal, ReasonRestoring, "restoring %s (containers %v) from checkpoint %s taken on node %s at %s (%s)",
			in.Identity, inject.RestoredContainers(in.Restore), rec.ID, rec.Node, in.Restore.Ref.Time, agentapi.HumanBytes(rec.Size))
	} else {
		w.metrics.wired.WithLabelValues("false").Inc()
		w.podEvent(ns, pod, corev1.EventTypeNormal, ReasonWired, "wired for checkpointing as %s (containers %v); no checkpoint to restore", in.Identity, cfg.Names())
	}
	return nil
}

// unrestorable names a pod-level setting under which Stasis cannot restore the pod. Stasis
// restores an app under its container's PID 1, the launcher: the restored tree's orphans are
// reparented to it, and the agent only accepts a restore asked by that PID 1. With a PID namespace
// shared by the whole pod the launcher is not PID 1 (the pause process is, and inherits the
// orphans); with the host's, it is neither. Refused at admission rather than cold-started at every
// restore, silently losing the progress the user enabled checkpoints for.
func unrestorable(spec *corev1.PodSpec) error {
	if spec.ShareProcessNamespace != nil && *spec.ShareProcessNamespace {
		return fmt.Errorf("spec.shareProcessNamespace: true is not supported for a checkpoint-enabled pod: " +
			"Stasis restores each container's app under the container's own PID 1, which a process namespace " +
			"shared by the pod does not give it (the pod's pause process would take the restored processes); " +
			"remove it, or turn checkpointing off for this pod")
	}
	if spec.HostPID {
		return fmt.Errorf("spec.hostPID: true is not supported for a checkpoint-enabled pod: " +
			"Stasis restores each container's app under the container's own PID 1, which the host's process " +
			"namespace does not give it; remove it, or turn checkpointing off for this pod")
	}
	return nil
}

// refuseOwn refuses a pod that sets fields of Stasis' namespace, naming (up to three of) them.
func (w *Webhook) refuseOwn(ns string, pod *corev1.Pod, marked bool, probs []string) *verdict {
	list := probs
	if len(list) > 3 {
		list = append(list[:3:3], fmt.Sprintf("and %d more", len(probs)-3))
	}
	hint := "rename or remove them"
	if marked {
		var keys []string
		for k := range pod.Annotations {
			if strings.HasPrefix(k, wiring.Prefix) {
				keys = append(keys, k)
			}
		}
		sort.Strings(keys)
		hint = fmt.Sprintf("the pod sets %s but is not what Stasis wires for it (copied from a wired pod, or forged): remove Stasis' annotations, volumes, containers and mounts and let Stasis wire it",
			strings.Join(keys, ", "))
	}
	msg := fmt.Sprintf("Stasis' own fields (%s* annotations, volumes and containers named %s*, mounts at or under %s) are set by Stasis only: %s; %s",
		wiring.Prefix, inject.ReservedPrefix, inject.ReservedDir, strings.Join(list, "; "), hint)
	w.podEvent(ns, pod, corev1.EventTypeWarning, ReasonRefused, "pod refused: %s", msg)
	return refuse("%s", msg)
}

// storage decides where the pod's checkpoints live (inject.Input without the restore) and returns
// the record to restore, if any.
func (w *Webhook) storage(ctx context.Context, ar *model.AdmissionReview, ns string, pod *corev1.Pod, cfg *labels.Config, id identity, marked bool) (inject.Input, *catalog.Record, *verdict) {
	in := inject.Input{Config: cfg, ToolsImage: w.cfg.ToolsImage, Identity: id.Key, Keep: w.cfg.KeepCheckpoints}
	shared := ""
	switch {
	case cfg.StorageVolume != "":
		claim, err := checkpointPVC(pod, cfg)
		if err != nil {
			return in, nil, refuse("%s: %v (the checkpoint record is kept on the PVC)", cfg.Key(labels.StorageVolume), err)
		}
		in.CheckpointVolume, shared = cfg.StorageVolume, claim
	case id.Owner == nil:
		return in, nil, refuse("%s: required for a pod without a controller: name a persistentVolumeClaim volume of the pod that holds its checkpoints (Stasis creates PVCs only for Jobs, StatefulSets, Deployments and ReplicaSets)",
			cfg.Key(labels.StorageVolume))
	default:
		in.CheckpointVolume = wiring.CheckpointVolume
	}
	if id.ClaimBase != "" {
		res, v := w.slot(ctx, ar, ns, pod, cfg, id, shared, marked)
		if v != nil {
			return in, nil, v
		}
		in.Identity, in.Annotations = res.Identity, map[string]string{catalog.AnnotationClaim: res.Token}
		if shared == "" {
			in.PVCName = res.PVC
		}
		return in, res.Record, nil
	}
	if shared != "" {
		rec, err := w.pod.store.Lookup(ctx, ns, shared, id.Key)
		if err != nil {
			return in, nil, w.internal(ns, pod, err)
		}
		return in, rec, nil
	}
	// Stasis' own PVC: named here, created by the PVC controller once the pod exists (the pod
	// stays Pending until then). Creating it here would leave it behind when a later admission
	// step (Pod Security, quota, another webhook) rejects the pod.
	in.PVCName = catalog.PVCName(id.Key)
	pvc, err := w.pod.store.PVC(ctx, ns, in.PVCName, false)
	switch {
	case apierrors.IsNotFound(err):
		return in, nil, nil
	case err != nil:
		return in, nil, w.internal(ns, pod, fmt.Errorf("reading checkpoint PVC %s/%s: %w", ns, in.PVCName, err))
	}
	if o := foreignOwner(pvc, id.Owner); o != nil {
		return in, nil, refuse("checkpoint PVC %s/%s belongs to an earlier %s %s (uid %s); wait until it is garbage-collected",
			ns, pvc.Name, o.Kind, o.Name, o.UID)
	}
	rec, _ := catalog.RecordOf(pvc, id.Key)
	return in, rec, nil
}

// slot is a NonIndexed Job pod's identity: a slot it claims (catalog.Claim). An unmarked pod
// claims one; a marked pod (our reinvocation) keeps the slot it claimed, verified against the
// catalog, and never claims twice.
//
// Taking an existing free slot is the one write left in admission: two pods admitted at the same
// time (by two replicas) must not get the same slot, and the slot is baked into the pod's immutable
// spec, so it must be reserved before the answer. It is an annotation on an existing PVC, and a
// claim whose pod never appears (rejected later) expires by itself: no pod carries its token, so
// after ClaimGrace the slot is free again (catalog.held). A new slot writes nothing (catalog.Claim);
// its PVC and claim come from the PVC controller once the pod exists.
func (w *Webhook) slot(ctx context.Context, ar *model.AdmissionReview, ns string, pod *corev1.Pod, cfg *labels.Config, id identity, shared string, marked bool) (catalog.ClaimResult, *verdict) {
	if !marked {
		res, err := w.pod.store.Claim(ctx, w.claimRequest(ns, id, shared, ar.DryRun))
		if err != nil {
			return res, w.internal(ns, pod, err)
		}
		return res, nil
	}
	slot, token := pod.Annotations[wiring.AnnotationIdentity], pod.Annotations[catalog.AnnotationClaim]
	res := catalog.ClaimResult{Identity: slot, Token: token, PVC: shared}
	if res.PVC == "" {
		res.PVC = catalog.PVCName(slot)
	}
	if !strings.HasPrefix(slot, id.ClaimBase+"/") {
		return res, w.refuseOwn(ns, pod, true, []string{fmt.Sprintf("metadata.annotations[%s]: %q is not a slot of %s", wiring.AnnotationIdentity, slot, id.What)})
	}
	var err error
	if ar.DryRun { // a dry run claimed nothing: there is no claim to verify
		res.Record, err = w.pod.store.Lookup(ctx, ns, res.PVC, slot)
		if err != nil {
			return res, w.internal(ns, pod, err)
		}
		return res, nil
	}
	p, problem, err := w.slotClaim(ctx, ns, res.PVC, id.ClaimBase, slot, token)
	if err != nil {
		return res, w.internal(ns, pod, err)
	}
	if problem != "" {
		return res, w.refuseOwn(ns, pod, true, []string{fmt.Sprintf("metadata.annotations[%s]: %s", catalog.AnnotationClaim, problem)})
	}
	if newClaimHolders(w).Holder(ns, token).Live {
		// The pod being admitted does not exist yet: a live pod with this token is another one.
		return res, w.refuseOwn(ns, pod, true, []string{fmt.Sprintf("metadata.annotations[%s]: slot %s is held by another running pod", catalog.AnnotationClaim, slot)})
	}
	if p != nil {
		res.Record, _ = catalog.RecordOf(p, slot)
	}
	return res, nil
}

// slotClaim reads the slot's PVC (nil when it does not exist yet) and checks the pod's claim on
// it: from the cache, and once live when the cache disagrees (our first invocation wrote the claim
// a moment ago; the reinvocation may come before the cache has it).
func (w *Webhook) slotClaim(ctx context.Context, ns, pvc, base, slot, token string) (*corev1.PersistentVolumeClaim, string, error) {
	var p *corev1.PersistentVolumeClaim
	problem := ""
	for _, live := range []bool{false, true} {
		var err error
		p, err = w.pod.store.PVC(ctx, ns, pvc, live)
		if err != nil && !apierrors.IsNotFound(err) {
			return nil, "", fmt.Errorf("reading checkpoint PVC %s/%s: %w", ns, pvc, err)
		}
		if err != nil {
			p = nil
		}
		if problem = claimProblem(p, base, slot, token); problem == "" {
			return p, "", nil
		}
	}
	return p, problem, nil
}

// claimProblem checks a marked pod's slot against the catalog (p is the slot's PVC, nil when it
// does not exist yet): the slot's claim must carry the pod's token, or, for a new slot (no claim
// written yet, catalog.Claim), the slot must be the one the token names and hold no checkpoint.
func claimProblem(p *corev1.PersistentVolumeClaim, base, slot, token string) string {
	if token == "" {
		return "missing"
	}
	if p != nil {
		if c, ok := catalog.ClaimOf(p, slot); ok {
			if c.Token != token {
				return fmt.Sprintf("the catalog's claim on %s is not this pod's", slot)
			}
			return ""
		}
	}
	if len(token) < 10 || slot != base+"/"+token[:10] {
		return fmt.Sprintf("the catalog's claim on %s is not this pod's", slot)
	}
	if p != nil {
		if _, ok := catalog.RecordOf(p, slot); ok {
			return fmt.Sprintf("slot %s holds a checkpoint but no claim of this pod", slot)
		}
	}
	return ""
}

// restoreOf turns a record into the restore of the pod's checkpointed containers; nil when the
// record covers none of them.
func restoreOf(rec *catalog.Record, cfg *labels.Config) *inject.Restore {
	if rec == nil {
		return nil
	}
	r := &inject.Restore{
		Ref: wiring.RestoreRef{ID: rec.ID, Node: rec.Node, Time: rec.Time.UTC().Format(time.RFC3339), Size: rec.Size},
		IDs: map[string]string{},
	}
	for _, c := range cfg.Containers {
		if cid := rec.Containers[c.Name]; cid != "" {
			r.IDs[c.Name] = cid
		}
	}
	if len(r.IDs) == 0 {
		return nil
	}
	return r
}

func (w *Webhook) internal(ns string, pod *corev1.Pod, err error) *verdict {
	w.podEvent(ns, pod, corev1.EventTypeWarning, ReasonRefused, "pod refused: %v", err)
	v := deny(http.StatusInternalServerError, metav1.StatusReasonInternalError, "stasis: %v", err)
	return &v
}

func (w *Webhook) pvcSpec(ns, identity string, owner *metav1.OwnerReference, pod *corev1.Pod, cfg *labels.Config) catalog.PVCSpec {
	return catalog.PVCSpec{
		Namespace: ns, Name: catalog.PVCName(identity), Identity: identity,
		// The checkpoints kept, the newest, and the one being written.
		Size:         cfg.VolumeSizeFor(&pod.Spec, w.cfg.DefaultVolumeSize, w.cfg.KeepCheckpoints+2),
		StorageClass: cfg.StorageClass, Owner: owner,
	}
}

func (w *Webhook) claimRequest(ns string, id identity, shared string, dryRun bool) catalog.ClaimRequest {
	return catalog.ClaimRequest{
		Namespace: ns, Base: id.ClaimBase, SharedPVC: shared,
		Holders: newClaimHolders(w), Grace: w.cfg.ClaimGrace, DryRun: dryRun,
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
