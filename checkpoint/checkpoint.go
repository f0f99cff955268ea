// Package checkpoint is the on-volume layout of checkpoints: one directory per checkpoint below a
// container's checkpoint directory, a manifest with the sha256 of every file, and a completion
// marker written last. The agent writes checkpoints; the restore init-container and the launcher
// verify them. A checkpoint without its marker, or whose files do not match the manifest, is never
// restored.
//
//	<dir>/                         wiring.CheckpointDir(identity, container)
//	  <id>/                        a complete checkpoint
//	    manifest.json              Manifest
//	    images/…                   CRIU images as files (empty when they are a pack: Manifest.Pack)
//	    files/<absolute path>      checkpoint-files copied from the container's filesystem
//	    dump.log                   CRIU's dump log
//	    COMPLETE                   the marker: sha256 of manifest.json, written last
//	  .tmp-<id>/                   a checkpoint being written (never read)
//	  .failed-<id>/                a failed dump kept for diagnosis (checkpoint-diagnosis)
//	  .prune-<name>/               a directory Prune is removing
//	  .chunks/                     chunks of packed images, shared by the checkpoints (pack.go)
package checkpoint

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/agentapi"
	"github.com/stasis-k8s/stasis/internal/confine"
)

// FormatVersion is the manifest format; a reader refuses others. 2: the images may be a pack of
// encrypted chunks (Manifest.Pack); a format-1 checkpoint is refused (the pod starts afresh).
const FormatVersion = 2

// File and directory names inside a checkpoint.
const (
	ManifestName = "manifest.json"
	MarkerName   = "COMPLETE"
	ImagesDir    = "images"
	FilesDir     = "files"
	DumpLogName  = "dump.log"
	tmpPrefix    = ".tmp-"
	failedPrefix = ".failed-"
	prunePrefix  = ".prune-" // a directory being removed by Prune
)

// Manifest describes one checkpoint.
type Manifest struct {
	Format int             `json:"format"`
	ID     string          `json:"id"`
	Pod    agentapi.PodRef `json:"pod"`
	// Identity is the checkpoint identity of the pod (stasis.dev/identity): a checkpoint restores
	// only into a pod of the same identity, namespace and image.
	Identity  string `json:"identity,omitempty"`
	Container string `json:"container"`
	Node      string `json:"node,omitempty"`
	Image     string `json:"image,omitempty"`
	// ImageRef is the image the runtime ran (digest), when known.
	ImageRef string `json:"imageRef,omitempty"`
	// Owner is the UID of the pod's controller (its incarnation: a Job re-created under the same
	// name has another); empty for plain pods.
	Owner  string `json:"owner,omitempty"`
	Reason string `json:"reason,omitempty"`
	// Generation orders the container's checkpoints on the volume (generation.go): assigned at
	// commit, one more than the highest already complete. 0 in checkpoints older than it.
	Generation uint64 `json:"generation,omitempty"`

	// Process is the app as it was dumped (the first process under the launcher's nested init).
	Process Process `json:"process"`
	// RootPid is the PID of the dumped root as seen in the container.
	RootPid int `json:"rootPid"`
	// Stdio of the dumped root: readlink of fds 0, 1, 2 ("pipe:[123]", "/dev/null", …), for
	// --inherit-fd at restore.
	Stdio []string `json:"stdio"`
	// OpenFiles are the regular files the tree had open: one whose size changed by restore time
	// must be handed to CRIU with --inherit-fd (else "has bad size").
	OpenFiles []OpenFile `json:"openFiles,omitempty"`
	// CopiedFiles are the checkpoint-files copied into files/.
	CopiedFiles []CopiedFile `json:"copiedFiles,omitempty"`
	// Carried are the files the tree held that a new container would lack, copied into carried/
	// by the agent on its own, and CarriedDirs the directories they (and the tree) need.
	Carried     []CarriedFile `json:"carried,omitempty"`
	CarriedDirs []CarriedDir  `json:"carriedDirs,omitempty"`
	// IPCNamespace: the pod's IPC namespace (its SysV objects) was dumped with the tree, and the
	// restored tree gets a private one holding them.
	IPCNamespace bool `json:"ipcNamespace,omitempty"`
	// Deleted are the image paths the container had deleted (checkpoint-rootfs): removed again
	// before the restore.
	Deleted []string `json:"deleted,omitempty"`

	// Pack lists the CRIU images stored as chunks (pack.go); nil when they are files in images/.
	Pack *Pack `json:"pack,omitempty"`

	CriuVersion int `json:"criuVersion"`
	// Files lists every file of the checkpoint (relative paths) but the manifest and the marker.
	Files []FileSum `json:"files"`
	// Size is the total of Files' sizes; ImagesSize the CRIU images alone.
	Size       int64     `json:"size"`
	ImagesSize int64     `json:"imagesSize"`
	Started    time.Time `json:"started"`
	Dumped     time.Time `json:"dumped"`
	Created    time.Time `json:"created"`
}

// Process is what the app was started with.
type Process struct {
	Argv []string `json:"argv"`
	Env  []string `json:"env,omitempty"`
	Cwd  string   `json:"cwd,omitempty"`
}

// OpenFile is a regular file open in the dumped tree.
type OpenFile struct {
	Pid   int    `json:"pid"` // as seen in the container
	FD    int    `json:"fd"`
	Path  string `json:"path"` // as seen in the container
	Size  int64  `json:"size"`
	Flags int    `json:"flags"`
	Pos   int64  `json:"pos"`
}

// CopiedFile is one checkpoint-files path.
type CopiedFile struct {
	Path string `json:"path"` // absolute, in the container
	// Stored is the relative path below the checkpoint directory; empty when the path did not exist.
	Stored  string `json:"stored,omitempty"`
	Missing bool   `json:"missing,omitempty"`
}

// FileSum is one file's size and sha256.
type FileSum struct {
	Path   string `json:"path"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

const idTimeLayout = "20060102T150405.000Z"

// NewID returns a checkpoint ID that sorts by creation time.
func NewID(now time.Time) string {
	var b [3]byte
	_, _ = rand.Read(b[:])
	return now.UTC().Format(idTimeLayout) + "-" + hex.EncodeToString(b[:])
}

// idBefore reports whether checkpoint id was created before t; an ID not made by NewID counts as
// old.
func idBefore(id string, t time.Time) bool {
	at, err := time.Parse(idTimeLayout, strings.SplitN(id, "-", 2)[0])
	return err != nil || at.Before(t)
}

// ValidID reports whether id can name a checkpoint directory.
func ValidID(id string) bool {
	return id != "" && id != "." && id != ".." && !strings.ContainsAny(id, "/\x00") && !strings.HasPrefix(id, ".")
}

// Entry is one complete checkpoint found by List.
type Entry struct {
	ID   string
	Path string
}

// List returns the complete checkpoints below dir (those with a marker), newest first. It does not
// verify checksums (Verify does).
func List(dir string) ([]Entry, error) {
	d, err := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY, 0)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer d.Close()
	ids, err := listAt(d)
	if err != nil {
		return nil, err
	}
	out := make([]Entry, len(ids))
	for i, id := range ids {
		out[i] = Entry{ID: id, Path: filepath.Join(dir, id)}
	}
	return out, nil
}

// listAt returns the IDs of the complete checkpoints in dir, newest first (by generation, then
// ID: sortNewest): directories (not symlinks) with a valid ID holding a regular marker file.
func listAt(dir *os.File) ([]string, error) {
	des, err := confine.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, de := range des {
		if de.IsDir() && ValidID(de.Name) && hasMarker(dir, de.Name) {
			out = append(out, de.Name)
		}
	}
	sortNewest(dir, out)
	return out, nil
}

// hasMarker reports whether dir/name is a directory (not a symlink) holding a regular marker.
func hasMarker(dir *os.File, name string) bool {
	d, err := confine.OpenEntry(dir, name, unix.O_PATH|unix.O_DIRECTORY)
	if err != nil {
		return false
	}
	defer d.Close()
	st, err := confine.Lstat(d, MarkerName)
	return err == nil && confine.IsReg(&st)
}

// Prune is PruneAt on a trusted path (tests, tools).
func Prune(dir string, keep int, staleBefore time.Time) error {
	d, err := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return fmt.Errorf("pruning %s: %w", dir, err)
	}
	defer d.Close()
	return PruneAt(d, keep, staleBefore)
}

// PruneAt keeps the newest keep complete checkpoints in the checkpoint directory dir (at least 1)
// and the newest keep failed ones, and removes leftovers of interrupted writes: directories
// without marker whose ID was created before staleBefore. Newer ones may be dumps in progress
// (another pod of the same identity on this node), and are kept.
//
// dir is a descriptor (opened confined inside the container's root, or held since the dump): the
// entries are listed from it and removed with confine.RemoveAll, which walks by descriptor, never
// follows a symlink and never crosses a mount, so a pod that plants symlinks in its checkpoint
// directory cannot make the agent remove anything outside it.
func PruneAt(dir *os.File, keep int, staleBefore time.Time) error {
	if keep < 1 {
		keep = 1
	}
	list, err := listAt(dir)
	if err != nil {
		return fmt.Errorf("pruning %s: %w", dir.Name(), err)
	}
	remove := list[min(keep, len(list)):]
	des, _ := confine.ReadDir(dir)
	var failed []string
	for _, de := range des {
		n := de.Name
		switch {
		case !de.IsDir(): // only directories are ours; a symlink or file is left alone
		case strings.HasPrefix(n, tmpPrefix) && idBefore(strings.TrimPrefix(n, tmpPrefix), staleBefore):
			remove = append(remove, n)
		case strings.HasPrefix(n, prunePrefix): // an interrupted prune
			remove = append(remove, n)
		case strings.HasPrefix(n, failedPrefix):
			failed = append(failed, n)
		case ValidID(n) && !hasMarker(dir, n) && idBefore(n, staleBefore):
			// A directory without marker that is not in progress: a crash between rename and marker.
			remove = append(remove, n)
		}
	}
	sort.Sort(sort.Reverse(sort.StringSlice(failed)))
	remove = append(remove, failed[min(keep, len(failed)):]...)
	var errs []string
	for _, n := range remove {
		if err := removeEntry(dir, n); err != nil {
			errs = append(errs, err.Error())
		}
	}
	if err := sweepChunks(dir, staleBefore); err != nil {
		errs = append(errs, err.Error())
	}
	if len(errs) > 0 {
		return fmt.Errorf("pruning %s: %s", dir.Name(), strings.Join(errs, "; "))
	}
	return nil
}

// MakeRoom is PruneAt keeping only the newest checkpoint, for a dump about to start on a volume
// short of room: its sweep waits (until ctx ends) for a sweep or a dump that holds the chunk
// store instead of skipping, since the space of the pruned checkpoints is in their chunks.
func MakeRoom(ctx context.Context, dir *os.File, staleBefore time.Time) error {
	if err := PruneAt(dir, 1, staleBefore); err != nil {
		return err
	}
	for {
		swept, err := trySweep(dir, staleBefore)
		if err != nil || swept {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("making room in %s: the chunk store stayed busy: %w", dir.Name(), ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// removeEntry renames name out of the way first, so that a checkpoint is never seen half removed
// under its ID, then removes it by descriptor (rename and removal never follow a symlink).
func removeEntry(dir *os.File, name string) error {
	gone := name
	if !strings.HasPrefix(name, prunePrefix) {
		gone = prunePrefix + strings.TrimLeft(name, ".")
		if err := unix.Renameat2(int(dir.Fd()), name, int(dir.Fd()), gone, unix.RENAME_NOREPLACE); err != nil {
			gone = name // e.g. no RENAME_NOREPLACE on this filesystem: remove in place
		}
	}
	return confine.RemoveAll(dir, gone)
}

// ReadManifest reads a checkpoint's manifest without verifying anything else.
func ReadManifest(ckpt string) (*Manifest, error) {
	b, err := os.ReadFile(filepath.Join(ckpt, ManifestName))
	if err != nil {
		return nil, err
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(ckpt, ManifestName), err)
	}
	return &m, nil
}

// NewestSize is the bytes on disk of the newest complete checkpoint in dir (a container's
// checkpoint directory): its regular files plus the chunks its pack references (shared ones
// included: the next dump may have to write them all anew). What the next dump of the container
// will need, roughly. Zero when there is none.
func NewestSize(dir *os.File) (int64, error) {
	list, err := listAt(dir)
	if err != nil || len(list) == 0 {
		return 0, err
	}
	d, err := confine.OpenEntry(dir, list[0], unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return 0, err
	}
	defer d.Close()
	var total int64
	err = walkTree(d, func(_ string, st *unix.Stat_t) error {
		if confine.IsReg(st) {
			total += st.Size
		}
		return nil
	})
	return total + packStored(dir, list[0]), err
}

// CompleteIDs lists the IDs of the complete checkpoints in dir (a container's checkpoint
// directory), newest first.
func CompleteIDs(dir *os.File) ([]string, error) { return listAt(dir) }

// RemoveCompleteAt removes every complete checkpoint in dir (a container's checkpoint directory):
// the work they hold is done (the app exited 0), and no later pod may continue from it.
func RemoveCompleteAt(dir *os.File) (int, error) {
	ids, err := listAt(dir)
	if err != nil {
		return 0, err
	}
	for _, id := range ids {
		if err := removeEntry(dir, id); err != nil {
			return 0, err
		}
	}
	// Their chunks go too; a dump in progress (any .tmp-) keeps the sweep for the next prune.
	if err := sweepChunks(dir, time.Time{}); err != nil {
		return len(ids), fmt.Errorf("removed %d checkpoints, then: %w", len(ids), err)
	}
	return len(ids), nil
}
