package catalog

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Holders tells whether a claim token is held by a pod: live = a pod carrying the token exists and
// is neither terminating nor finished; seen = a pod carrying it is known at all.
type Holders interface {
	Holder(namespace, token string) (live, seen bool)
}

// ClaimRequest asks for an identity for a new pod of a NonIndexed Job. Its pods are
// interchangeable, so identities are slots Base/0, Base/1, ...; a new pod takes a free slot that
// has a complete checkpoint, else a free slot without one, else a new slot.
type ClaimRequest struct {
	Namespace string
	Base      string
	// SharedPVC is the claim name of the user's checkpoint volume; empty means one PVC per slot,
	// created by Stasis from NewPVC.
	SharedPVC string
	NewPVC    func(identity string) PVCSpec
	Holders   Holders
	// Grace keeps a claim whose pod is not (yet) seen: the pod may still be in admission or not
	// yet in the informer cache.
	Grace    time.Duration
	MaxSlots int
	DryRun   bool
}

// ClaimResult is the slot a pod got.
type ClaimResult struct {
	Identity string
	Token    string
	Record   *Record
	// PVC is the claim name that holds the slot's checkpoints.
	PVC string
	// Created: this claim created the slot's PVC.
	Created bool
}

// NewToken returns a random claim token.
func NewToken() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

type slot struct {
	identity string
	pvc      *corev1.PersistentVolumeClaim // nil: not created yet
	record   *Record
}

// Claim takes a slot atomically: the claim is written with the PVC's resourceVersion (or by
// creating the slot's PVC), so two pods admitted at once by two replicas never get the same slot.
func (s *Store) Claim(ctx context.Context, req ClaimRequest) (ClaimResult, error) {
	if req.MaxSlots <= 0 {
		req.MaxSlots = 1000
	}
	token := NewToken()
	pvcs := s.Client.CoreV1().PersistentVolumeClaims(req.Namespace)
	for attempt := 0; attempt < 10; attempt++ {
		var withRecord, empty []slot
		var fresh *slot
		var shared *corev1.PersistentVolumeClaim
		if req.SharedPVC != "" {
			p, err := pvcs.Get(ctx, req.SharedPVC, metav1.GetOptions{})
			if err != nil {
				return ClaimResult{}, fmt.Errorf("reading checkpoint PVC %s/%s: %w", req.Namespace, req.SharedPVC, err)
			}
			shared = p
		}
		for i := 0; i < req.MaxSlots && fresh == nil; i++ {
			id := fmt.Sprintf("%s/%d", req.Base, i)
			p := shared
			if p == nil {
				got, err := pvcs.Get(ctx, PVCName(id), metav1.GetOptions{})
				if apierrors.IsNotFound(err) {
					fresh = &slot{identity: id}
					break
				}
				if err != nil {
					return ClaimResult{}, fmt.Errorf("reading checkpoint PVC %s/%s: %w", req.Namespace, PVCName(id), err)
				}
				p = got
			}
			rec, hasRec := RecordOf(p, id)
			c, claimed := ClaimOf(p, id)
			if shared != nil && !hasRec && !claimed {
				fresh = &slot{identity: id, pvc: p}
				break
			}
			if claimed && s.held(req, c, rec) {
				continue
			}
			if hasRec {
				withRecord = append(withRecord, slot{identity: id, pvc: p, record: rec})
			} else {
				empty = append(empty, slot{identity: id, pvc: p})
			}
		}
		var pick *slot
		switch {
		case len(withRecord) > 0:
			pick = &withRecord[0]
		case len(empty) > 0:
			pick = &empty[0]
		case fresh != nil:
			pick = fresh
		default:
			return ClaimResult{}, fmt.Errorf("no free checkpoint slot among %d for %s", req.MaxSlots, req.Base)
		}
		res := ClaimResult{Identity: pick.identity, Token: token, Record: pick.record, PVC: req.SharedPVC}
		if res.PVC == "" {
			res.PVC = PVCName(pick.identity)
		}
		if req.DryRun {
			return res, nil
		}
		claim, _ := json.Marshal(Claim{Token: token, Time: s.now().UTC()})
		if pick.pvc == nil {
			spec := req.NewPVC(pick.identity)
			spec.Annotations = map[string]string{ClaimKey(pick.identity): string(claim)}
			_, err := pvcs.Create(ctx, NewPVC(spec), metav1.CreateOptions{})
			if apierrors.IsAlreadyExists(err) {
				continue // another pod took this new slot first
			}
			if err != nil {
				return ClaimResult{}, fmt.Errorf("creating checkpoint PVC %s/%s: %w", req.Namespace, spec.Name, err)
			}
			res.Created = true
			return res, nil
		}
		err := s.annotate(ctx, pick.pvc, ClaimKey(pick.identity), string(claim))
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

func (s *Store) held(req ClaimRequest, c *Claim, rec *Record) bool {
	if req.Holders != nil {
		if live, seen := req.Holders.Holder(req.Namespace, c.Token); seen {
			return live
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
