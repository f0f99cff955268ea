package catalog

import (
	"context"
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

func withRecord(p *corev1.PersistentVolumeClaim, r Record) *corev1.PersistentVolumeClaim {
	s := &Store{Client: fake.NewClientset(p)}
	if err := s.Save(context.Background(), p.Namespace, p.Name, r); err != nil {
		panic(err)
	}
	got, _ := s.Client.CoreV1().PersistentVolumeClaims(p.Namespace).Get(context.Background(), p.Name, metav1.GetOptions{})
	return got
}

type holders map[string][2]bool // token → live, seen

func (h holders) Holder(_, token string) (bool, bool) { v := h[token]; return v[0], v[1] }

func TestClaim(t *testing.T) {
	slot := func(i string) string { return "job/ns/j/slot/" + i }
	claimed := func(p *corev1.PersistentVolumeClaim, id, token string, at time.Time) *corev1.PersistentVolumeClaim {
		if p.Annotations == nil {
			p.Annotations = map[string]string{}
		}
		p.Annotations[ClaimKey(id)] = `{"token":"` + token + `","time":"` + at.Format(time.RFC3339) + `"}`
		return p
	}
	recorded := func(id string) *corev1.PersistentVolumeClaim {
		return withRecord(pvc(PVCName(id)), Record{Identity: id, ID: "ck", Time: now, Containers: map[string]string{"c": "ck"}})
	}
	tests := []struct {
		name    string
		objs    []runtime.Object
		holders holders
		want    string
		rec     bool
		created bool
	}{
		{name: "first pod: new slot 0", want: slot("0"), created: true},
		{name: "slot 0 held by a live pod: slot 1", objs: []runtime.Object{claimed(pvc(PVCName(slot("0"))), slot("0"), "t0", now.Add(-time.Hour))},
			holders: holders{"t0": {true, true}}, want: slot("1"), created: true},
		{name: "slot 0 claimed moments ago by a pod not yet seen: slot 1", objs: []runtime.Object{claimed(pvc(PVCName(slot("0"))), slot("0"), "t0", now.Add(-time.Second))},
			want: slot("1"), created: true},
		{name: "stale claim of a pod never seen: slot 0 reused", objs: []runtime.Object{claimed(pvc(PVCName(slot("0"))), slot("0"), "t0", now.Add(-time.Hour))},
			want: slot("0")},
		{name: "holder evicted: its checkpointed slot is taken over first",
			objs: []runtime.Object{
				claimed(pvc(PVCName(slot("0"))), slot("0"), "t0", now.Add(-time.Hour)),
				claimed(recorded(slot("1")), slot("1"), "t1", now.Add(-time.Hour)),
			},
			holders: holders{"t0": {false, true}, "t1": {false, true}}, want: slot("1"), rec: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := fake.NewClientset(tt.objs...)
			s := &Store{Client: c, Now: func() time.Time { return now }}
			res, err := s.Claim(context.Background(), ClaimRequest{Namespace: "ns", Base: "job/ns/j/slot", Holders: tt.holders, Grace: time.Minute,
				NewPVC: func(id string) PVCSpec {
					return PVCSpec{Namespace: "ns", Name: PVCName(id), Identity: id, Size: resource.MustParse("1Gi")}
				}})
			require.NoError(t, err)
			assert.Equal(t, tt.want, res.Identity)
			assert.Equal(t, tt.rec, res.Record != nil)
			assert.Equal(t, tt.created, res.Created)
			p, err := c.CoreV1().PersistentVolumeClaims("ns").Get(context.Background(), PVCName(res.Identity), metav1.GetOptions{})
			require.NoError(t, err)
			cl, ok := ClaimOf(p, res.Identity)
			require.True(t, ok)
			assert.Equal(t, res.Token, cl.Token, "the claim is written on the slot's PVC")
		})
	}
}

// Two replicas admit two pods at once: the loser of the race (conflict / already exists) looks
// again and takes another slot.
func TestClaimRace(t *testing.T) {
	c := fake.NewClientset()
	raced := false
	c.PrependReactor("create", "persistentvolumeclaims", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if !raced {
			raced = true
			// Another replica creates slot 0 first.
			other := NewPVC(PVCSpec{Namespace: "ns", Name: PVCName("job/ns/j/slot/0"), Identity: "job/ns/j/slot/0", Size: resource.MustParse("1Gi"),
				Annotations: map[string]string{ClaimKey("job/ns/j/slot/0"): `{"token":"other","time":"2026-11-29T10:00:00Z"}`}})
			if err := c.Tracker().Add(other); err != nil {
				return true, nil, err
			}
			return true, nil, apierrors.NewAlreadyExists(schema.GroupResource{Resource: "persistentvolumeclaims"}, other.Name)
		}
		return false, nil, nil
	})
	s := &Store{Client: c, Now: func() time.Time { return now }}
	res, err := s.Claim(context.Background(), ClaimRequest{Namespace: "ns", Base: "job/ns/j/slot", Grace: time.Minute,
		NewPVC: func(id string) PVCSpec {
			return PVCSpec{Namespace: "ns", Name: PVCName(id), Identity: id, Size: resource.MustParse("1Gi")}
		}})
	require.NoError(t, err)
	assert.Equal(t, "job/ns/j/slot/1", res.Identity)
}

func ptr[T any](v T) *T { return &v }
