package checkpoint

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/internal/confine"
)

// sweepChunks removes the chunk files no complete checkpoint of dir references (mark and sweep),
// after PruneAt removed checkpoints. It never races a dump:
//   - a dump holds the chunk store's lock shared (flock) from Writer.Pack until its commit or
//     abort, and the sweep takes it exclusively without waiting: while any dump of this node
//     writes or reuses chunks, the sweep is skipped (the next prune does it);
//   - a .tmp- checkpoint younger than staleBefore may be a dump of another node sharing the
//     volume, whose lock this node does not see: the sweep is skipped too.
//
// A manifest that cannot be parsed references nothing (such a checkpoint is never restored); one
// that cannot be read stops the sweep. Only regular files are removed; nothing is followed.
func sweepChunks(dir *os.File, staleBefore time.Time) error {
	_, err := trySweep(dir, staleBefore)
	return err
}

// trySweep is sweepChunks reporting whether it swept: false when a dump or another sweep holds
// the store, or a dump is in progress.
func trySweep(dir *os.File, staleBefore time.Time) (bool, error) {
	chunks, err := confine.OpenEntry(dir, chunksDir, unix.O_RDONLY|unix.O_DIRECTORY)
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) {
		return true, nil // no store, or something a pod planted there (not followed)
	}
	if err != nil {
		return false, fmt.Errorf("chunk store: %w", err)
	}
	defer chunks.Close()
	if err := unix.Flock(int(chunks.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if err == unix.EWOULDBLOCK {
			return false, nil // a dump in progress
		}
		return false, fmt.Errorf("locking the chunk store: %w", err)
	}
	if dumpInProgress(dir, staleBefore) {
		return false, nil
	}
	live, err := liveChunks(dir)
	if err != nil {
		return false, err
	}
	return true, sweepUnmarked(chunks, live)
}

// dumpInProgress reports a .tmp- checkpoint younger than staleBefore in dir.
func dumpInProgress(dir *os.File, staleBefore time.Time) bool {
	des, _ := confine.ReadDir(dir)
	for _, de := range des {
		if de.IsDir() && strings.HasPrefix(de.Name, tmpPrefix) && !idBefore(strings.TrimPrefix(de.Name, tmpPrefix), staleBefore) {
			return true
		}
	}
	return false
}

// liveChunks marks the pack files the complete checkpoints of dir reference.
func liveChunks(dir *os.File) (map[string]bool, error) {
	ids, err := listAt(dir)
	if err != nil {
		return nil, err
	}
	live := map[string]bool{}
	for _, id := range ids {
		m, err := readManifestAt(dir, id)
		if err != nil {
			if _, lerr := confine.Lstat(dir, id); errors.Is(lerr, unix.ENOENT) {
				continue // pruned meanwhile by another prune: its chunks are not live
			}
			return nil, fmt.Errorf("sweeping chunks: checkpoint %s: %w", id, err)
		}
		if m == nil || m.Pack == nil || m.Pack.validate() != nil {
			continue
		}
		for _, img := range m.Pack.Images {
			for _, c := range img.Chunks {
				if c.Name != "" {
					live[packFile(c.Pack)] = true
				}
			}
		}
	}
	return live, nil
}

// readManifestAt reads checkpoint id's manifest, unverified; nil when it cannot be parsed.
func readManifestAt(dir *os.File, id string) (*Manifest, error) {
	d, err := confine.OpenEntry(dir, id, unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	data, err := readSmall(d, ManifestName)
	if err != nil {
		return nil, err
	}
	m, err := parseManifest(data)
	if err != nil {
		return nil, nil
	}
	return m, nil
}

// sweepUnmarked removes the pack files no checkpoint references and the temporary files of
// dumps that ended without finishing (none is running: the caller holds the lock).
func sweepUnmarked(chunks *os.File, live map[string]bool) error {
	des, err := confine.ReadDir(chunks)
	if err != nil {
		return fmt.Errorf("chunk store: %w", err)
	}
	var errs []error
	for _, de := range des {
		if !de.IsReg() || live[de.Name] {
			continue
		}
		if err := unix.Unlinkat(int(chunks.Fd()), de.Name, 0); err != nil && err != unix.ENOENT {
			errs = append(errs, fmt.Errorf("removing chunk file %s: %w", de.Name, err))
		}
	}
	return errors.Join(errs...)
}

// packStored is the bytes on disk of the chunks checkpoint id references (0 without a pack).
func packStored(dir *os.File, id string) int64 {
	m, err := readManifestAt(dir, id)
	if err != nil || m == nil || m.Pack == nil {
		return 0
	}
	return m.Pack.Stored
}
