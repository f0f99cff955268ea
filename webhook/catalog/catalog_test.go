package catalog

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// These tests use client-go's FAKE clientset; conflicts are injected with reactors.

var now = time.Date(2026, 11, 29, 10, 0, 0, 0, time.UTC)

func pvc(name string) *corev1.PersistentVolumeClaim {
	return &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "ns"}}
}

func TestPVCName(t *testing.T) {
	for _, id := range []string{"pod/ns/a", "job/ns/train/3", "job/very-long-namespace-name/very-long-job-name-indeed/slot/12", "sts/NS/Db_1.x"} {
		n := PVCName(id)
		assert.Empty(t, validation.IsDNS1123Subdomain(n), "%s → %s", id, n)
		assert.LessOrEqual(t, len(n), 63)
		assert.Equal(t, n, PVCName(id), "deterministic")
	}
	assert.NotEqual(t, PVCName("job/ns/a/1"), PVCName("job/ns/a_1"), "distinct identities never collide")
}

func TestSave(t *testing.T) {
	rec := func(id string, at time.Time) Record {
		return Record{Identity: "pod/ns/a", ID: id, Node: "n", Time: at, Containers: map[string]string{"c": id}}
	}
	tests := []struct {
		name      string
		existing  *Record
		save      Record
		conflicts int
		want      string
		err       string
	}{
		{name: "first record", save: rec("c1", now), want: "c1"},
		{name: "newer replaces older", existing: ptr(rec("c1", now)), save: rec("c2", now.Add(time.Minute)), want: "c2"},
		{name: "older never replaces newer", existing: ptr(rec("c2", now.Add(time.Minute))), save: rec("c1", now), want: "c2"},
		{name: "a higher generation replaces, though its node's clock is behind", existing: ptr(gen(rec("c1", now), 1)),
			save: gen(rec("c0", now.Add(-time.Hour)), 2), want: "c0"},
		{name: "a lower generation never replaces, though its node's clock is ahead", existing: ptr(gen(rec("c2", now), 2)),
			save: gen(rec("c3", now.Add(time.Hour)), 1), want: "c2"},
		{name: "a generation replaces a record without one", existing: ptr(rec("c1", now.Add(time.Hour))), save: gen(rec("c2", now), 1), want: "c2"},
		{name: "conflict is retried", save: rec("c1", now), conflicts: 2, want: "c1"},
		{name: "persistent conflict fails", save: rec("c1", now), conflicts: 100, err: "recording checkpoint c1 of pod/ns/a on PVC ns/p"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := pvc("p")
			if tt.existing != nil {
				p = withRecord(p, *tt.existing)
			}
			c := fake.NewClientset(p)
			n := 0
			c.PrependReactor("patch", "persistentvolumeclaims", func(k8stesting.Action) (bool, runtime.Object, error) {
				if n < tt.conflicts {
					n++
					return true, nil, apierrors.NewConflict(schema.GroupResource{Resource: "persistentvolumeclaims"}, "p", nil)
				}
				return false, nil, nil
			})
			s := &Store{Client: c, Now: func() time.Time { return now }}
			err := s.Save(context.Background(), "ns", "p", tt.save)
			if tt.err != "" {
				assert.ErrorContains(t, err, tt.err)
				return
			}
			require.NoError(t, err)
			r, err := s.Lookup(context.Background(), "ns", "p", "pod/ns/a")
			require.NoError(t, err)
			require.NotNil(t, r)
			assert.Equal(t, tt.want, r.ID)
		})
	}
}

func gen(r Record, g uint64) Record { r.Generation = g; return r }

func withRecord(p *corev1.PersistentVolumeClaim, r Record) *corev1.PersistentVolumeClaim {
	s := &Store{Client: fake.NewClientset(p)}
	if err := s.Save(context.Background(), p.Namespace, p.Name, r); err != nil {
		panic(err)
	}
	got, _ := s.Client.CoreV1().PersistentVolumeClaims(p.Namespace).Get(context.Background(), p.Name, metav1.GetOptions{})
	return got
}

type holders map[string][2]bool // token → live, seen

func (h holders) Holder(_, token string) Holder {
	v := h[token]
	return Holder{Live: v[0], Seen: v[1]}
}

// slotPVC is a Stasis-created PVC of a slot, as the PVC controller creates it.
func slotPVC(id string) *corev1.PersistentVolumeClaim {
	return NewPVC(PVCSpec{Namespace: "ns", Name: PVCName(id), Identity: id, Size: resource.MustParse("1Gi")})
}

func TestClaim(t *testing.T) {
	slot := func(i string) string { return "job/ns/j/slot/" + i }
	claimed := func(p *corev1.PersistentVolumeClaim, id, token string, at time.Time) *corev1.PersistentVolumeClaim {
		p.Annotations[ClaimKey(id)] = `{"token":"` + token + `","time":"` + at.Format(time.RFC3339) + `"}`
		return p
	}
	recorded := func(id string) *corev1.PersistentVolumeClaim {
		return withRecord(slotPVC(id), Record{Identity: id, ID: "ck", Time: now, Containers: map[string]string{"c": "ck"}})
	}
	tests := []struct {
		name    string
		objs    []runtime.Object
		holders holders
		want    string // "" = a new slot
		rec     bool
	}{
		{name: "first pod: a new slot, nothing written"},
		{name: "slot a held by a live pod: a new slot", objs: []runtime.Object{claimed(slotPVC(slot("a")), slot("a"), "t0", now.Add(-time.Hour))},
			holders: holders{"t0": {true, true}}},
		{name: "slot a claimed moments ago by a pod not yet seen: a new slot", objs: []runtime.Object{claimed(slotPVC(slot("a")), slot("a"), "t0", now.Add(-time.Second))}},
		{name: "stale claim of a pod never seen (rejected in admission): slot a reused", objs: []runtime.Object{claimed(slotPVC(slot("a")), slot("a"), "t0", now.Add(-time.Hour))},
			want: slot("a")},
		{name: "holder evicted: its checkpointed slot is taken over first",
			objs: []runtime.Object{
				claimed(slotPVC(slot("a")), slot("a"), "t0", now.Add(-time.Hour)),
				claimed(recorded(slot("b")), slot("b"), "t1", now.Add(-time.Hour)),
			},
			holders: holders{"t0": {false, true}, "t1": {false, true}}, want: slot("b"), rec: true},
		{name: "another Job's slots and foreign PVCs are not slots",
			objs: []runtime.Object{slotPVC("job/ns/other/slot/a"), pvc("user-data")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := fake.NewClientset(tt.objs...)
			s := &Store{Client: c, Now: func() time.Time { return now }}
			res, err := s.Claim(context.Background(), ClaimRequest{Namespace: "ns", Base: "job/ns/j/slot", Holders: tt.holders, Grace: time.Minute})
			require.NoError(t, err)
			assert.Equal(t, tt.rec, res.Record != nil)
			assert.Equal(t, PVCName(res.Identity), res.PVC)
			if tt.want == "" {
				assert.True(t, res.Fresh)
				assert.Equal(t, slot(res.Token[:10]), res.Identity, "a new slot is named by its token: unique without a write")
				l, err := c.CoreV1().PersistentVolumeClaims("ns").List(context.Background(), metav1.ListOptions{})
				require.NoError(t, err)
				assert.Len(t, l.Items, len(tt.objs), "a new slot creates nothing")
				return
			}
			assert.Equal(t, tt.want, res.Identity)
			assert.False(t, res.Fresh)
			p, err := c.CoreV1().PersistentVolumeClaims("ns").Get(context.Background(), PVCName(res.Identity), metav1.GetOptions{})
			require.NoError(t, err)
			cl, ok := ClaimOf(p, res.Identity)
			require.True(t, ok)
			assert.Equal(t, res.Token, cl.Token, "the claim is written on the slot's PVC")
		})
	}
}

type succeeded map[string]bool // token → its pod succeeded

func (h succeeded) Holder(_, token string) Holder {
	return Holder{Seen: true, Succeeded: h[token]}
}

// A slot whose holder succeeded did its work: the slot is free, but its last record is not
// restored by the next pod (that would redo finished work), and the claim removes the record
// from the PVC in the same write. A slot whose holder was evicted is still taken over with its
// record, first.
func TestClaimOfASucceededHoldersSlotStartsFresh(t *testing.T) {
	a, b := "job/ns/j/slot/a", "job/ns/j/slot/b"
	pa := withRecord(slotPVC(a), Record{Identity: a, ID: "done", Time: now, Containers: map[string]string{"c": "done"}})
	pa.Annotations[ClaimKey(a)] = `{"token":"ta","time":"2026-11-29T09:00:00Z"}`
	c := fake.NewClientset(pa)
	s := &Store{Client: c, Now: func() time.Time { return now }}
	req := ClaimRequest{Namespace: "ns", Base: "job/ns/j/slot", Holders: succeeded{"ta": true}, Grace: time.Minute}
	res, err := s.Claim(context.Background(), req)
	require.NoError(t, err)
	assert.Equal(t, a, res.Identity, "the finished slot is free")
	assert.Nil(t, res.Record, "its record is not restored")
	p, err := c.CoreV1().PersistentVolumeClaims("ns").Get(context.Background(), PVCName(a), metav1.GetOptions{})
	require.NoError(t, err)
	_, has := RecordOf(p, a)
	assert.False(t, has, "the record is gone from the PVC")
	cl, ok := ClaimOf(p, a)
	require.True(t, ok)
	assert.Equal(t, res.Token, cl.Token)

	// The same with an evicted holder (not succeeded) on slot b: b is taken with its record.
	pb := withRecord(slotPVC(b), Record{Identity: b, ID: "ck", Time: now, Containers: map[string]string{"c": "ck"}})
	pb.Annotations[ClaimKey(b)] = `{"token":"tb","time":"2026-11-29T09:00:00Z"}`
	c = fake.NewClientset(pa, pb)
	s = &Store{Client: c, Now: func() time.Time { return now }}
	res, err = s.Claim(context.Background(), req)
	require.NoError(t, err)
	assert.Equal(t, b, res.Identity, "a checkpointed slot first")
	require.NotNil(t, res.Record)
	assert.Equal(t, "ck", res.Record.ID)
}

// A claim among many slots reads them with one list (live here: no cache), never a GET per
// slot, and asks the holders once per slot.
func TestClaimAmongManySlotsIsOneList(t *testing.T) {
	var objs []runtime.Object
	h := holders{}
	for i := range 200 {
		id := fmt.Sprintf("job/ns/j/slot/s%03d", i)
		p := slotPVC(id)
		tok := fmt.Sprintf("t%d", i)
		p.Annotations[ClaimKey(id)] = `{"token":"` + tok + `","time":"2026-11-29T09:00:00Z"}`
		h[tok] = [2]bool{i != 150, true} // all held but s150
		objs = append(objs, p)
	}
	c := fake.NewClientset(objs...)
	s := &Store{Client: c, Now: func() time.Time { return now }}
	res, err := s.Claim(context.Background(), ClaimRequest{Namespace: "ns", Base: "job/ns/j/slot", Holders: h, Grace: time.Minute})
	require.NoError(t, err)
	assert.Equal(t, "job/ns/j/slot/s150", res.Identity)
	verbs := map[string]int{}
	for _, a := range c.Actions() {
		verbs[a.GetVerb()]++
	}
	assert.Equal(t, map[string]int{"list": 1, "patch": 1}, verbs, "one list, one claim write")
}

// Slots on the user's shared PVC: those with a record are reused, the rest are new slots.
func TestClaimShared(t *testing.T) {
	id := "job/ns/j/slot/x"
	shared := withRecord(pvc("shared"), Record{Identity: id, ID: "ck", Time: now, Containers: map[string]string{"c": "ck"}})
	shared.ResourceVersion = "5"
	c := fake.NewClientset(shared)
	s := &Store{Client: c, Now: func() time.Time { return now }}
	req := ClaimRequest{Namespace: "ns", Base: "job/ns/j/slot", SharedPVC: "shared", Grace: time.Minute}
	res, err := s.Claim(context.Background(), req)
	require.NoError(t, err)
	assert.Equal(t, id, res.Identity)
	assert.Equal(t, "shared", res.PVC)
	require.NotNil(t, res.Record)
	res2, err := s.Claim(context.Background(), req)
	require.NoError(t, err)
	assert.True(t, res2.Fresh, "the recorded slot is held now")
	require.NoError(t, s.EnsureClaim(context.Background(), "ns", "shared", res2.Identity, res2.Token), "the PVC controller claims the new slot")
	require.NoError(t, s.EnsureClaim(context.Background(), "ns", "shared", res2.Identity, res2.Token), "idempotent")
	assert.ErrorIs(t, s.EnsureClaim(context.Background(), "ns", "shared", res2.Identity, "other"), ErrClaimedByOther)
}

// Two replicas admit two pods at once for one free slot: the loser of the race (conflict on the
// resourceVersion) looks again and, the slot being taken, gets a new slot.
func TestClaimRace(t *testing.T) {
	a := "job/ns/j/slot/a"
	c := fake.NewClientset(slotPVC(a))
	raced := false
	c.PrependReactor("patch", "persistentvolumeclaims", func(k8stesting.Action) (bool, runtime.Object, error) {
		if !raced {
			raced = true
			// Another replica claims slot a first.
			p, err := c.Tracker().Get(schema.GroupVersionResource{Version: "v1", Resource: "persistentvolumeclaims"}, "ns", PVCName(a))
			if err != nil {
				return true, nil, err
			}
			other := p.(*corev1.PersistentVolumeClaim).DeepCopy()
			other.Annotations[ClaimKey(a)] = `{"token":"other","time":"2026-11-29T10:00:00Z"}`
			if err := c.Tracker().Update(schema.GroupVersionResource{Version: "v1", Resource: "persistentvolumeclaims"}, other, "ns"); err != nil {
				return true, nil, err
			}
			return true, nil, apierrors.NewConflict(schema.GroupResource{Resource: "persistentvolumeclaims"}, other.Name, nil)
		}
		return false, nil, nil
	})
	s := &Store{Client: c, Now: func() time.Time { return now }}
	res, err := s.Claim(context.Background(), ClaimRequest{Namespace: "ns", Base: "job/ns/j/slot", Grace: time.Minute})
	require.NoError(t, err)
	assert.True(t, raced)
	assert.True(t, res.Fresh, "slot a was taken meanwhile: a new slot, got %s", res.Identity)
}

func ptr[T any](v T) *T { return &v }
