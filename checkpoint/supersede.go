package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"os"
	"regexp"

	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/internal/confine"
)

// A pod whose checkpoint was restored into another pod is superseded: its replacement carries the
// lineage on, and a later checkpoint of the old pod would roll the replacement back (it would be
// the newest generation). That old pod can still be running: its node lost contact (kubelet or
// network down) and the replacement was started elsewhere; when the node comes back, its periodic
// and termination checkpoints would land on the shared volume after the replacement's. The
// restore leaves a mark, .superseded-<old pod UID>, in the container's checkpoint directory, and a
// commit of a superseded pod's checkpoint is refused. Fencing through the volume needs no API
// server and holds whichever node writes.
//
// The mark is on the pod-writable volume: a pod can only stop checkpoints of pods whose volume it
// can write, which it could delete anyway.

const supersededPrefix = ".superseded-"

// ErrSuperseded refuses a checkpoint of a pod whose earlier checkpoint was restored into another.
var ErrSuperseded = errors.New("this pod was replaced: a pod restored from its checkpoint carries its work on, and a newer checkpoint of this pod would roll that one back")

var podUIDChars = regexp.MustCompile(`^[a-zA-Z0-9-]{1,64}$`)

// Supersede marks pod podUID as replaced in dir (a container's checkpoint directory): its later
// commits fail with ErrSuperseded. Taken under the same lock as a commit's generation, so a commit
// either precedes the mark or sees it.
func Supersede(ctx context.Context, dir *os.File, podUID string) error {
	if !podUIDChars.MatchString(podUID) {
		return fmt.Errorf("superseding pod %q: not a pod UID", podUID)
	}
	// A descriptor of its own: flock belongs to an open file description.
	fd, err := unix.Openat(int(dir.Fd()), ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("superseding pod %s: %w", podUID, err)
	}
	own := os.NewFile(uintptr(fd), dir.Name())
	defer own.Close()
	unlock := lockGenerations(ctx, own)
	defer unlock()
	if superseded(own, podUID) {
		return nil
	}
	return writeFileSync(own, supersededPrefix+podUID, nil)
}

// superseded reports whether podUID is marked replaced in dir.
func superseded(dir *os.File, podUID string) bool {
	if !podUIDChars.MatchString(podUID) {
		return false
	}
	_, err := confine.Lstat(dir, supersededPrefix+podUID)
	return err == nil
}

// Quarantine takes complete checkpoint id of dir out of the candidates for restore, keeping it for
// diagnosis as a failed one (.failed-<id>, pruned like failed dumps): a chunk of it failed its
// check after the app had resumed (a lazy restore), and every later pod of the identity would
// otherwise restore it again and be killed again.
func Quarantine(dir *os.File, id string) error {
	if !ValidID(id) {
		return fmt.Errorf("quarantining checkpoint %q: not a checkpoint ID", id)
	}
	err := unix.Renameat2(int(dir.Fd()), id, int(dir.Fd()), failedPrefix+id, unix.RENAME_NOREPLACE)
	if err != nil {
		return fmt.Errorf("quarantining checkpoint %s: %w", id, err)
	}
	return dir.Sync()
}
