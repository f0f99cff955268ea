package checkpoint

import (
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// writeSized is write with an image of n bytes, so that NewestSize tells checkpoints apart.
func writeSized(t *testing.T, dir string, at time.Time, n int) string {
	t.Helper()
	w, err := Begin(dir, NewID(at))
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(w.Path(), ImagesDir, "pages-1.img"), make([]byte, n), 0o600))
	require.NoError(t, w.Commit(&Manifest{Container: "app"}))
	return w.Final()
}

func openDir(t *testing.T, dir string) *os.File {
	t.Helper()
	d, err := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY, 0)
	require.NoError(t, err)
	t.Cleanup(func() { d.Close() })
	return d
}

// A node whose clock was set back an hour writes the newest checkpoint: its ID says it is the
// oldest. Every "newest" decision follows the generation: the listing, the restore's pick
// (CompleteIDs), what the next dump needs (NewestSize) and what Prune keeps.
func TestGenerationOrdersCheckpointsWhenAClockIsSetBack(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	first := writeSized(t, dir, now, 1<<10)
	second := writeSized(t, dir, now.Add(time.Minute), 1<<14)
	third := writeSized(t, dir, now.Add(-time.Hour), 1<<18) // the clock went back
	require.Less(t, filepath.Base(third), filepath.Base(first), "the ID alone would call it the oldest")

	for i, c := range []string{first, second, third} {
		m, err := Verify(c)
		require.NoError(t, err)
		assert.Equal(t, uint64(i+1), m.Generation, "%s: one more than the highest complete", filepath.Base(c))
	}
	l, err := List(dir)
	require.NoError(t, err)
	assert.Equal(t, []string{filepath.Base(third), filepath.Base(second), filepath.Base(first)}, ids(l))

	d := openDir(t, dir)
	got, err := CompleteIDs(d)
	require.NoError(t, err)
	assert.Equal(t, filepath.Base(third), got[0], "the restore picks the last written")
	size, err := NewestSize(d)
	require.NoError(t, err)
	assert.GreaterOrEqual(t, size, int64(1<<18), "the size of the last written")
	assert.Less(t, size, int64(1<<18+1<<14))

	require.NoError(t, PruneAt(d, 1, now.Add(-2*time.Hour)))
	l, err = List(dir)
	require.NoError(t, err)
	assert.Equal(t, []string{filepath.Base(third)}, ids(l), "prune keeps the last written, not the latest clock")
	assert.NoDirExists(t, first)
	assert.NoDirExists(t, second)

	fourth := writeSized(t, dir, now.Add(-2*time.Hour), 10)
	m, err := Verify(fourth)
	require.NoError(t, err)
	assert.Equal(t, uint64(4), m.Generation, "counted from the highest left after pruning")
}

// Checkpoints written before generations existed (none in the manifest) rank below every one
// that has a generation, and by ID among themselves.
func TestCheckpointsWithoutGenerationRankBelow(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	older := writeSized(t, dir, now.Add(-2*time.Minute), 1)
	legacy := writeSized(t, dir, now.Add(-time.Minute), 1)
	for _, c := range []string{older, legacy} { // as an older agent wrote them
		stripGeneration(t, c)
	}
	d := openDir(t, dir)
	assert.Equal(t, uint64(0), GenerationAt(d, filepath.Base(legacy)))
	got, err := CompleteIDs(d)
	require.NoError(t, err)
	assert.Equal(t, []string{filepath.Base(legacy), filepath.Base(older)}, got, "by ID among themselves")

	next := writeSized(t, dir, now.Add(-time.Hour), 1)
	got, err = CompleteIDs(d)
	require.NoError(t, err)
	assert.Equal(t, filepath.Base(next), got[0], "generation 1 ranks above the legacy ones, whatever the clock")
}

// Two writers committing in one directory at once (two pods of an identity on a node) take
// distinct generations: the commit holds the directory's lock from reading the highest to the
// marker.
func TestConcurrentCommitsTakeDistinctGenerations(t *testing.T) {
	dir := t.TempDir()
	const n = 8
	paths := make([]string, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			paths[i] = writeSized(t, dir, time.Now().Add(time.Duration(i)*time.Millisecond), 10)
		}()
	}
	wg.Wait()
	seen := map[uint64]bool{}
	for _, p := range paths {
		m, err := ReadManifest(p)
		require.NoError(t, err)
		assert.False(t, seen[m.Generation], "generation %d taken twice", m.Generation)
		seen[m.Generation] = true
	}
	for g := uint64(1); g <= n; g++ {
		assert.True(t, seen[g], "generation %d", g)
	}
}

func TestRankNewer(t *testing.T) {
	assert.True(t, Rank{2, "a"}.Newer(Rank{1, "z"}), "the generation first")
	assert.True(t, Rank{1, "b"}.Newer(Rank{1, "a"}), "then the ID")
	assert.False(t, Rank{1, "a"}.Newer(Rank{1, "a"}))
}

func ids(l []Entry) []string {
	out := make([]string, len(l))
	for i, e := range l {
		out[i] = e.ID
	}
	return out
}

// stripGeneration rewrites a manifest without its generation (its marker no longer matches:
// ordering does not verify, the restore does).
func stripGeneration(t *testing.T, ckpt string) {
	t.Helper()
	p := filepath.Join(ckpt, ManifestName)
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	var m map[string]any
	require.NoError(t, json.Unmarshal(b, &m))
	delete(m, "generation")
	b, err = json.Marshal(m)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(p, b, 0o600))
}

// The generation is read from the top of the manifest only: a manifest whose generation comes
// after a huge field (forged) counts as 0, and nothing past the window is read.
func TestGenerationIn(t *testing.T) {
	assert.Equal(t, uint64(7), generationIn(strings.NewReader(`{"format":1,"id":"x","pod":{"name":"p"},"generation":7,"files":[]}`)))
	assert.Equal(t, uint64(0), generationIn(strings.NewReader(`{"format":1}`)))
	assert.Equal(t, uint64(0), generationIn(strings.NewReader(`[1]`)))
	assert.Equal(t, uint64(0), generationIn(strings.NewReader(`{"generation":-1}`)))
	huge := `{"reason":"` + strings.Repeat("a", 2*generationWindow) + `","generation":9}`
	assert.Equal(t, uint64(0), generationIn(io.LimitReader(strings.NewReader(huge), generationWindow)))
	m, err := json.Marshal(Manifest{ID: "x", Generation: 3, Files: make([]FileSum, 5000)})
	require.NoError(t, err)
	assert.Less(t, strings.Index(string(m), `"generation"`), 1024, "written before the big fields")
	assert.Equal(t, uint64(3), generationIn(io.LimitReader(strings.NewReader(string(m)), generationWindow)))
}
