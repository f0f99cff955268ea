package checkpoint

import (
	"context"
	"encoding/json"
	"io"
	"os"
	"sort"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/internal/confine"
)

// Checkpoints are ordered by generation, then by ID. An ID starts with the writing node's clock
// (NewID), and a node whose clock is behind would make its newer checkpoint look older: restored
// instead of the newest, or pruned first. The generation is assigned at commit as one more than
// the highest among the complete checkpoints already in the directory, so it grows with every
// commit on the volume whatever the clocks say. Checkpoints written before generations existed
// have 0 and sort below every newer one, by ID among themselves.
//
// The generation is read from the manifest without verifying its marker: ordering decides which
// checkpoint is tried or kept, and the checkpoint tried is still verified in full. The directory
// belongs to the pod, which could delete its checkpoints anyway; a forged generation can only
// hurt the pod that forged it.

// Rank is a checkpoint's place in the order: compare with Newer.
type Rank struct {
	Generation uint64
	ID         string
}

// Newer reports whether r is newer than o.
func (r Rank) Newer(o Rank) bool {
	if r.Generation != o.Generation {
		return r.Generation > o.Generation
	}
	return r.ID > o.ID
}

// GenerationAt is the generation recorded in the manifest of checkpoint id in dir (a container's
// checkpoint directory); 0 when it has none or cannot be read.
func GenerationAt(dir *os.File, id string) uint64 {
	d, err := openEntryDir(dir, id)
	if err != nil {
		return 0
	}
	defer d.Close()
	f, _, err := openRegular(d, ManifestName)
	if err != nil {
		return 0
	}
	defer f.Close()
	return generationIn(io.LimitReader(f, generationWindow))
}

// generationWindow bounds what ordering reads of a manifest. The generation is written near the
// top (before the process, the files and their sums), so a listing costs a few KiB per
// checkpoint, also in a directory a pod filled with large forged manifests.
const generationWindow = 64 << 10

// generationIn reads the top-level "generation" of a manifest, stopping there.
func generationIn(r io.Reader) uint64 {
	dec := json.NewDecoder(r)
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return 0
	}
	for dec.More() {
		key, err := dec.Token()
		if err != nil {
			return 0
		}
		if key == "generation" {
			var g uint64
			if dec.Decode(&g) != nil {
				return 0
			}
			return g
		}
		var skip json.RawMessage
		if dec.Decode(&skip) != nil {
			return 0
		}
	}
	return 0
}

// RanksAt returns the ranks of the complete checkpoints in dir, newest first.
func RanksAt(dir *os.File) ([]Rank, error) {
	ids, err := listAt(dir)
	if err != nil {
		return nil, err
	}
	out := make([]Rank, len(ids))
	for i, id := range ids {
		out[i] = Rank{Generation: GenerationAt(dir, id), ID: id}
	}
	return out, nil
}

// sortNewest orders ids (complete checkpoints in dir) newest first.
func sortNewest(dir *os.File, ids []string) {
	ranks := make([]Rank, len(ids))
	for i, id := range ids {
		ranks[i] = Rank{Generation: GenerationAt(dir, id), ID: id}
	}
	sort.Slice(ranks, func(i, j int) bool { return ranks[i].Newer(ranks[j]) })
	for i, r := range ranks {
		ids[i] = r.ID
	}
}

// nextGeneration is one more than the highest generation among the complete checkpoints in dir.
func nextGeneration(dir *os.File) uint64 {
	ids, _ := listAt(dir)
	var top uint64
	for _, id := range ids {
		top = max(top, GenerationAt(dir, id))
	}
	if top == ^uint64(0) { // a forged maximum: the order among such checkpoints falls to the ID
		return top
	}
	return top + 1
}

// lockGenerations serializes commits in dir, from reading the highest generation to the marker
// that makes the new one count, so that two writers of one directory (two pods of an identity on
// a node, or nodes sharing a volume) never take the same generation. Best effort, within ctx
// (the dump's deadline): a filesystem without flock, or a holder that does not let go, leaves a
// tie, which the ID breaks.
func lockGenerations(ctx context.Context, dir *os.File) (unlock func()) {
	fd := int(dir.Fd())
	for {
		err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { _ = unix.Flock(fd, unix.LOCK_UN) }
		}
		if err != unix.EWOULDBLOCK {
			return func() {}
		}
		select {
		case <-ctx.Done():
			return func() {}
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func openEntryDir(dir *os.File, name string) (*os.File, error) {
	return confine.OpenEntry(dir, name, unix.O_RDONLY|unix.O_DIRECTORY)
}
