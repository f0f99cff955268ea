// Package catalog is where the webhook learns that a checkpoint exists: records kept as annotations
// on the checkpoint PVC, so that they survive webhook restarts and every replica sees the same
// thing. A record is written only after the agent reported a complete checkpoint, with optimistic
// concurrency (the PVC's resourceVersion), and an older record never replaces a newer one (Record.Newer).
//
// One PVC can hold the records of several identities (a user volume shared by the pods of a Job),
// so every annotation is keyed by a hash of the identity: checkpoint.stasis.dev/<hash> holds the
// Record, claim.stasis.dev/<hash> the claim of a NonIndexed Job's pod on that identity.
package catalog

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	corev1listers "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/util/retry"
)

const (
	recordPrefix = "checkpoint.stasis.dev/"
	claimPrefix  = "claim.stasis.dev/"
	// LabelManaged marks PVCs Stasis created.
	LabelManaged = "stasis.dev/managed"
	// AnnotationIdentity on a Stasis-created PVC names the identity it was created for.
	AnnotationIdentity = "stasis.dev/identity"
	// AnnotationClaim on a pod of a NonIndexed Job carries the token of its claim.
	AnnotationClaim = "stasis.dev/claim"
)

// Record is one complete checkpoint of an identity.
type Record struct {
	Identity string `json:"identity"`
	// ID is the checkpoint ID of the operation (the agent uses one per operation); Containers has
	// the ID per container, which is what the restore uses.
	ID         string            `json:"id"`
	Containers map[string]string `json:"containers"`
	Node       string            `json:"node"`
	Time       time.Time         `json:"time"`
	Size       int64             `json:"size"`
	PodUID     string            `json:"podUID,omitempty"`
	// Generation is the highest of the containers' checkpoint generations (the agent's count of
	// commits on the volume); 0 in records older than it.
	Generation uint64 `json:"generation,omitempty"`
}

// Newer reports whether r is a newer checkpoint than o: by generation, which the agent counts on
// the volume, then by time, which comes from a node's clock (records without a generation, or
// two checkpoints that tie).
func (r *Record) Newer(o *Record) bool {
	if r.Generation != o.Generation {
		return r.Generation > o.Generation
	}
	return r.Time.After(o.Time)
}

// Claim is a NonIndexed Job pod's hold on an identity.
type Claim struct {
	Token string    `json:"token"`
	Time  time.Time `json:"time"`
}

// Hash is the key of an identity in annotation names.
func Hash(identity string) string {
	h := sha256.Sum256([]byte(identity))
	return hex.EncodeToString(h[:16])
}

// RecordKey and ClaimKey are the annotation names for an identity.
func RecordKey(identity string) string { return recordPrefix + Hash(identity) }
func ClaimKey(identity string) string  { return claimPrefix + Hash(identity) }

var notName = regexp.MustCompile(`[^a-z0-9-]+`)

// PVCName is the deterministic name of the PVC Stasis creates for an identity: readable prefix,
// hash suffix so that distinct identities never collide.
func PVCName(identity string) string {
	s := strings.Trim(notName.ReplaceAllString(strings.ToLower(identity), "-"), "-")
	if len(s) > 40 {
		s = strings.Trim(s[:40], "-")
	}
	return "stasis-" + s + "-" + Hash(identity)[:10]
}

// RecordOf returns the record for identity on pvc.
func RecordOf(pvc *corev1.PersistentVolumeClaim, identity string) (*Record, bool) {
	v, ok := pvc.Annotations[RecordKey(identity)]
	if !ok {
		return nil, false
	}
	var r Record
	if json.Unmarshal([]byte(v), &r) != nil || r.Identity != identity || len(r.Containers) == 0 {
		return nil, false
	}
	return &r, true
}

// ClaimOf returns the claim for identity on pvc.
func ClaimOf(pvc *corev1.PersistentVolumeClaim, identity string) (*Claim, bool) {
	v, ok := pvc.Annotations[ClaimKey(identity)]
	if !ok {
		return nil, false
	}
	var c Claim
	if json.Unmarshal([]byte(v), &c) != nil {
		return nil, false
	}
	return &c, true
}

// Store reads records from the informer cache of PVCs and writes them through the API server.
//
// Reads come from the cache so that admission costs no API request (a flood of pod creations
// must not turn into a flood of GETs, nor wait for client-side rate-limit tokens). Writes carry
// the resourceVersion read, so a stale cache can only cost a conflict, never a lost update: the
// retry after a conflict reads live, once.
type Store struct {
	Client kubernetes.Interface
	// PVCs is the informer cache of PVCs; nil reads every PVC live (tests of the live path).
	PVCs corev1listers.PersistentVolumeClaimLister
	Now  func() time.Time
}

// PVC returns the PVC ns/name from the cache, or from the API server when live (or when there is
// no cache). A copy: callers may not change cached objects.
func (s *Store) PVC(ctx context.Context, ns, name string, live bool) (*corev1.PersistentVolumeClaim, error) {
	if live || s.PVCs == nil {
		return s.Client.CoreV1().PersistentVolumeClaims(ns).Get(ctx, name, metav1.GetOptions{})
	}
	p, err := s.PVCs.PersistentVolumeClaims(ns).Get(name)
	if err != nil {
		return nil, err
	}
	return p.DeepCopy(), nil
}

// managed lists Stasis' own PVCs in ns, from the cache unless live.
func (s *Store) managed(ctx context.Context, ns string, live bool) ([]*corev1.PersistentVolumeClaim, error) {
	if live || s.PVCs == nil {
		l, err := s.Client.CoreV1().PersistentVolumeClaims(ns).List(ctx, metav1.ListOptions{LabelSelector: LabelManaged + "=true"})
		if err != nil {
			return nil, err
		}
		out := make([]*corev1.PersistentVolumeClaim, len(l.Items))
		for i := range l.Items {
			out[i] = &l.Items[i]
		}
		return out, nil
	}
	sel, err := labels.Parse(LabelManaged + "=true")
	if err != nil {
		return nil, err
	}
	return s.PVCs.PersistentVolumeClaims(ns).List(sel)
}

func (s *Store) now() time.Time {
	if s.Now != nil {
		return s.Now()
	}
	return time.Now()
}

// Lookup returns the record for identity on the PVC ns/pvc, nil when there is none.
func (s *Store) Lookup(ctx context.Context, ns, pvc, identity string) (*Record, error) {
	p, err := s.PVC(ctx, ns, pvc, false)
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading checkpoint record from PVC %s/%s: %w", ns, pvc, err)
	}
	r, _ := RecordOf(p, identity)
	return r, nil
}

// Save writes rec on the PVC ns/pvc unless a newer record is already there. A conflict (another
// replica wrote meanwhile) re-reads and tries again.
func (s *Store) Save(ctx context.Context, ns, pvc string, rec Record) error {
	val, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	live := false // first from the cache; after a conflict the cache is behind: read live
	err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
		p, err := s.PVC(ctx, ns, pvc, live)
		live = true
		if err != nil {
			return err
		}
		if old, ok := RecordOf(p, rec.Identity); ok && (old.Newer(&rec) || old.ID == rec.ID) {
			return nil
		}
		return s.annotate(ctx, p, RecordKey(rec.Identity), string(val))
	})
	if err != nil {
		return fmt.Errorf("recording checkpoint %s of %s on PVC %s/%s: %w", rec.ID, rec.Identity, ns, pvc, err)
	}
	return nil
}

// annotate sets one annotation on p with a merge patch that carries p's resourceVersion: a write
// made since p was read is a conflict, as with an update, but the webhook needs only `patch` on
// PVCs and can change nothing but what the patch names.
func (s *Store) annotate(ctx context.Context, p *corev1.PersistentVolumeClaim, key, val string) error {
	return s.annotateAll(ctx, p, map[string]*string{key: &val})
}

// annotateAll is annotate for several annotations at once; a nil value removes one.
func (s *Store) annotateAll(ctx context.Context, p *corev1.PersistentVolumeClaim, set map[string]*string) error {
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{
		"resourceVersion": p.ResourceVersion,
		"annotations":     set,
	}})
	if err != nil {
		return err
	}
	_, err = s.Client.CoreV1().PersistentVolumeClaims(p.Namespace).Patch(ctx, p.Name, types.MergePatchType, patch, metav1.PatchOptions{})
	return err
}

// PVCSpec is what EnsurePVC creates.
type PVCSpec struct {
	Namespace, Name, Identity string
	Size                      resource.Quantity
	StorageClass              string
	Owner                     *metav1.OwnerReference
	// Annotations set at creation (e.g. a claim).
	Annotations map[string]string
}

// NewPVC builds the PVC Stasis creates for an identity: ReadWriteOnce (one pod at a time uses an
// identity), owned by the controller so it is garbage-collected with it.
func NewPVC(s PVCSpec) *corev1.PersistentVolumeClaim {
	ann := map[string]string{AnnotationIdentity: s.Identity}
	for k, v := range s.Annotations {
		ann[k] = v
	}
	p := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{
			Name: s.Name, Namespace: s.Namespace,
			Labels:      map[string]string{LabelManaged: "true"},
			Annotations: ann,
		},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			Resources: corev1.VolumeResourceRequirements{
				Requests: corev1.ResourceList{corev1.ResourceStorage: s.Size},
			},
		},
	}
	if s.StorageClass != "" {
		sc := s.StorageClass
		p.Spec.StorageClassName = &sc
	}
	if s.Owner != nil {
		o := *s.Owner
		// The controller owns the PVC for garbage collection only; it must not block its deletion.
		o.BlockOwnerDeletion = nil
		p.OwnerReferences = []metav1.OwnerReference{o}
	}
	return p
}

// EnsurePVC creates the PVC unless it exists. created reports whether this call created it.
func (s *Store) EnsurePVC(ctx context.Context, spec PVCSpec) (created bool, err error) {
	_, err = s.Client.CoreV1().PersistentVolumeClaims(spec.Namespace).Create(ctx, NewPVC(spec), metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("creating checkpoint PVC %s/%s: %w", spec.Namespace, spec.Name, err)
	}
	return true, nil
}
