package catalog

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
)

// Holder is what the pods carrying a claim token say about its slot.
type Holder struct {
	// Live: a pod carrying the token exists and is neither terminating nor finished.
	Live bool
	// Seen: a pod carrying it is known at all (or was seen deleted).
	Seen bool
	// Succeeded: a pod carrying it ran to completion. The slot's work is done: the slot is free,
	// and its last record must not be restored by the next pod (that would redo finished work).
	Succeeded bool
}

// Holders tells who holds claim tokens. A Claim asks once per slot of the Job: an implementation
// should answer from one pass over its pods, not one per question.
type Holders interface {
	Holder(namespace, token string) Holder
}

// ClaimRequest asks for an identity for a new pod of a NonIndexed Job. Its pods are
// interchangeable, so identities are slots Base/<name>; a new pod takes a free slot that has a
// complete checkpoint, else a free slot without one, else a new slot.
type ClaimRequest struct {
	Namespace string
	Base      string
	// SharedPVC is the claim name of the user's checkpoint volume; empty means one PVC per slot,
	// created by Stasis (the PVC controller, once the pod exists).
	SharedPVC string
	Holders   Holders
	// Grace keeps a claim whose pod is not (yet) seen: the pod may still be in admission or not
	// yet in the informer cache.
	Grace  time.Duration
	DryRun bool
}

// ClaimResult is the slot a pod got.
type ClaimResult struct {
	Identity string
	Token    string
	Record   *Record
	// PVC is the claim name that holds the slot's checkpoints.
	PVC string
	// Fresh: a new slot. Nothing was written: its name is unique (random), so no other pod can
	// get it, and its PVC and claim are written by the PVC controller once the pod exists.
	Fresh bool
}

// NewToken returns a random claim token.
func NewToken() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

type slot struct {
	identity string
	pvc      *corev1.PersistentVolumeClaim
	record   *Record
	done     bool // its holder succeeded: its record is dropped when the slot is claimed
}

// Claim takes a slot for a pod being admitted, writing nothing that a rejected pod would leave
// behind but an expiring claim:
//
//   - an existing free slot is claimed by an annotation written with the PVC's resourceVersion,
//     so two pods admitted at once (by two replicas) never get the same one; a claim whose pod
//     never appears (rejected later in admission) stops holding the slot after Grace;
//   - a new slot gets a random name (the token's prefix): unique without any write, so nothing is
//     created for a pod the API server may still reject. Slots are named, not numbered, for that
//     reason: a number would have to be reserved before the answer.
func (s *Store) Claim(ctx context.Context, req ClaimRequest) (ClaimResult, error) {
	token := NewToken()
	for attempt := 0; attempt < 10; attempt++ {
		// The first look is at the cache; after a conflict it is behind: look live.
		slots, err := s.slots(ctx, req, attempt > 0)
		if err != nil {
			return ClaimResult{}, err
		}
		var withRecord, empty []slot
		for _, sl := range slots {
			if c, ok := ClaimOf(sl.pvc, sl.identity); ok {
				h := req.holder(c.Token)
				if s.held(req, h, c, sl.record) {
					continue
				}
				if h.Succeeded {
					sl.record, sl.done = nil, true // finished work: the slot starts fresh
				}
			}
			if sl.record != nil {
				withRecord = append(withRecord, sl)
			} else {
				empty = append(empty, sl)
			}
		}
		var pick *slot
		switch {
		case len(withRecord) > 0:
			pick = &withRecord[0]
		case len(empty) > 0:
			pick = &empty[0]
		default:
			id := req.Base + "/" + token[:10]
			return ClaimResult{Identity: id, Token: token, PVC: req.pvcOf(id), Fresh: true}, nil
		}
		res := ClaimResult{Identity: pick.identity, Token: token, Record: pick.record, PVC: req.pvcOf(pick.identity)}
		if req.DryRun {
			return res, nil
		}
		err = s.claimSlot(ctx, pick, token)
		if apierrors.IsConflict(err) {
			continue // someone claimed or recorded meanwhile: look again
		}
		if err != nil {
			return ClaimResult{}, fmt.Errorf("claiming %s on PVC %s/%s: %w", pick.identity, req.Namespace, pick.pvc.Name, err)
		}
		return res, nil
	}
	return ClaimResult{}, fmt.Errorf("could not claim a checkpoint slot for %s: too many concurrent claims, retry", req.Base)
}

// claimSlot writes the claim on the slot's PVC. A slot whose holder succeeded loses its record in
// the same write: no later reader (this pod's reinvocation, the agent, a restore) may take the
// finished work's checkpoint for work left to do.
func (s *Store) claimSlot(ctx context.Context, sl *slot, token string) error {
	claim, _ := json.Marshal(Claim{Token: token, Time: s.now().UTC()})
	set := map[string]*string{ClaimKey(sl.identity): ptrTo(string(claim))}
	if sl.done {
		set[RecordKey(sl.identity)] = nil
	}
	return s.annotateAll(ctx, sl.pvc, set)
}

func ptrTo(s string) *string { return &s }

func (r ClaimRequest) holder(token string) Holder {
	if r.Holders == nil {
		return Holder{}
	}
	return r.Holders.Holder(r.Namespace, token)
}

func (r ClaimRequest) pvcOf(identity string) string {
	if r.SharedPVC != "" {
		return r.SharedPVC
	}
	return PVCName(identity)
}

// slots lists the existing slots under req.Base, ordered by identity: on the shared PVC those
// with a record (a slot without one is no better than a new slot); else Stasis' PVCs created for
// a slot (label LabelManaged, annotation AnnotationIdentity).
func (s *Store) slots(ctx context.Context, req ClaimRequest, live bool) ([]slot, error) {
	prefix := req.Base + "/"
	var out []slot
	if req.SharedPVC != "" {
		p, err := s.PVC(ctx, req.Namespace, req.SharedPVC, live)
		if err != nil {
			return nil, fmt.Errorf("reading checkpoint PVC %s/%s: %w", req.Namespace, req.SharedPVC, err)
		}
		for k, v := range p.Annotations {
			var r Record
			if !strings.HasPrefix(k, recordPrefix) || json.Unmarshal([]byte(v), &r) != nil || !strings.HasPrefix(r.Identity, prefix) {
				continue
			}
			if rec, ok := RecordOf(p, r.Identity); ok {
				out = append(out, slot{identity: r.Identity, pvc: p, record: rec})
			}
		}
	} else {
		l, err := s.managed(ctx, req.Namespace, live)
		if err != nil {
			return nil, fmt.Errorf("listing checkpoint PVCs in %s: %w", req.Namespace, err)
		}
		for _, p := range l {
			id := p.Annotations[AnnotationIdentity]
			if !strings.HasPrefix(id, prefix) || p.Name != PVCName(id) || p.DeletionTimestamp != nil {
				continue
			}
			rec, _ := RecordOf(p, id)
			out = append(out, slot{identity: id, pvc: p, record: rec})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].identity < out[j].identity })
	return out, nil
}

func (s *Store) held(req ClaimRequest, h Holder, c *Claim, rec *Record) bool {
	if req.Holders != nil {
		if h.Seen {
			return h.Live
		}
		// A checkpoint recorded after the claim proves that the claiming pod existed; it is not
		// seen any more, so it is gone (a suspended Job resumed within the grace period must
		// restore, not start new slots — found by the integration tier).
		if rec != nil && !rec.Time.Before(c.Time) {
			return false
		}
	}
	return s.now().Sub(c.Time) < req.Grace
}

// ErrClaimedByOther: the slot's claim carries another pod's token.
var ErrClaimedByOther = errors.New("claimed by another pod")

// EnsureClaim writes a pod's claim on its slot's existing PVC when the slot has none (a new slot on
// a shared PVC, claimed by the PVC controller once the pod exists). A slot claimed by another
// token is left alone and reported.
func (s *Store) EnsureClaim(ctx context.Context, ns, pvc, identity, token string) error {
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		p, err := s.Client.CoreV1().PersistentVolumeClaims(ns).Get(ctx, pvc, metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("reading checkpoint PVC %s/%s: %w", ns, pvc, err)
		}
		if c, ok := ClaimOf(p, identity); ok {
			if c.Token != token {
				return fmt.Errorf("slot %s on PVC %s/%s: %w", identity, ns, pvc, ErrClaimedByOther)
			}
			return nil
		}
		claim, _ := json.Marshal(Claim{Token: token, Time: s.now().UTC()})
		return s.annotate(ctx, p, ClaimKey(identity), string(claim))
	})
}
