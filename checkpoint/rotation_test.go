package checkpoint

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// rotatingKEKs is a KEKSource whose current key the test rotates (what an operator does to the
// namespace's Secret, see namespacekeys).
type rotatingKEKs struct {
	current string
	keys    map[string][]byte
}

func (r *rotatingKEKs) Current(string) (string, []byte, error) {
	return r.current, r.keys[r.current], nil
}

func (r *rotatingKEKs) ByID(ns, id string) ([]byte, error) {
	if k, ok := r.keys[id]; ok {
		return k, nil
	}
	return nil, fmt.Errorf("key %q of %s removed", id, ns)
}

// After a rotation the first dump shares no chunk wrapped under the old KEK, so once the
// checkpoints written before the rotation are pruned the old key can be removed and what is kept
// still restores; later dumps deduplicate again.
func TestPackKEKRotation(t *testing.T) {
	dir := t.TempDir()
	src := &rotatingKEKs{current: "k1", keys: map[string][]byte{"k1": make([]byte, 32)}}
	ring, err := NewKeyRing(testRingKey, src)
	require.NoError(t, err)
	heap := jsonHeap(8<<20, 9)
	t0 := time.Now().Add(-time.Hour)
	first, err := packCheckpointWith(t, ring, dir, t0, PackOptions{}, map[string][]byte{"pages-1.img": heap})
	require.NoError(t, err)

	k2 := make([]byte, 32)
	k2[0] = 2
	src.keys["k2"], src.current = k2, "k2"
	second, err := packCheckpointWith(t, ring, dir, t0.Add(time.Minute), PackOptions{}, map[string][]byte{"pages-1.img": heap})
	require.NoError(t, err)
	third, err := packCheckpointWith(t, ring, dir, t0.Add(2*time.Minute), PackOptions{}, map[string][]byte{"pages-1.img": heap})
	require.NoError(t, err)

	open := func(ckpt string) (*Manifest, *PackReader) {
		d, err := os.Open(ckpt)
		require.NoError(t, err)
		defer d.Close()
		m, err := CheckAt(d, filepath.Base(ckpt), testRingKey)
		require.NoError(t, err)
		parent, err := os.Open(dir)
		require.NoError(t, err)
		defer parent.Close()
		r, err := OpenPack(parent, m, ring)
		require.NoError(t, err)
		t.Cleanup(func() { r.Close() })
		return m, r
	}
	m1, _ := open(first)
	m2, _ := open(second)
	require.Len(t, m2.Pack.Keys, 1, "nothing shared with the checkpoint under the old KEK")
	require.Equal(t, "k2", m2.Pack.Keys[0].KEK)
	require.Equal(t, m1.Pack.Written, m2.Pack.Written, "the first dump after a rotation writes every chunk")
	m3, _ := open(third)
	require.Zero(t, m3.Pack.Written, "later dumps deduplicate again")

	require.NoError(t, Prune(dir, 2, time.Now().Add(-2*time.Hour)))
	require.NoDirExists(t, first)
	delete(src.keys, "k1")
	_, r3 := open(third)
	got, err := readAllImage(r3, "pages-1.img")
	require.NoError(t, err, "the old key removed: what is kept restores")
	require.Equal(t, heap, got)
}
