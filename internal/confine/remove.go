package confine

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// maxDepth bounds the recursion of RemoveAll (one descriptor per level): a tree deeper than that
// was not made by the agent.
const maxDepth = 256

// RemoveAll removes the entry name of dir and, when it is a directory, everything below it. It
// works on descriptors only: a symlink is removed, never followed; a directory is entered with
// O_NOFOLLOW and RESOLVE_NO_XDEV, so a mount point (or a symlink swapped in for a directory) is
// never entered, and nothing outside dir's filesystem and subtree is touched. A missing entry is
// not an error.
func RemoveAll(dir *os.File, name string) error {
	return removeAll(dir, name, 0)
}

func removeAll(dir *os.File, name string, depth int) error {
	if err := checkName(name); err != nil {
		return err
	}
	if depth > maxDepth {
		return fmt.Errorf("%s: more than %d directories deep, not removed", join(dir.Name(), name), maxDepth)
	}
	// A few rounds: the entry may be swapped between a file and a directory while we look.
	for range 8 {
		err := unix.Unlinkat(int(dir.Fd()), name, 0)
		if err == nil || err == unix.ENOENT {
			return nil
		}
		if err != unix.EISDIR {
			return &os.PathError{Op: "unlinkat", Path: join(dir.Name(), name), Err: err}
		}
		sub, err := openat2(dir, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0, beneath)
		switch {
		case errors.Is(err, unix.ENOENT), errors.Is(err, unix.ENOTDIR), errors.Is(err, unix.ELOOP):
			continue // gone or replaced by a non-directory: look again
		case errors.Is(err, unix.EXDEV):
			return fmt.Errorf("%s: a mount point, not removed", join(dir.Name(), name))
		case err != nil:
			return err
		}
		err = removeContents(sub, depth+1)
		sub.Close()
		if err != nil {
			return err
		}
		err = unix.Unlinkat(int(dir.Fd()), name, unix.AT_REMOVEDIR)
		if err == nil || err == unix.ENOENT {
			return nil
		}
		if err != unix.ENOTEMPTY && err != unix.ENOTDIR {
			return &os.PathError{Op: "rmdir", Path: join(dir.Name(), name), Err: err}
		}
	}
	return fmt.Errorf("%s: keeps changing while it is removed", join(dir.Name(), name))
}

// RemoveContents empties the directory d (a descriptor the caller holds, e.g. of a directory it
// created), as RemoveAll does for each entry.
func RemoveContents(d *os.File) error {
	return removeContents(d, 0)
}

func removeContents(d *os.File, depth int) error {
	for range 8 {
		names, err := ReadDirNames(d)
		if err != nil {
			return err
		}
		if len(names) == 0 {
			return nil
		}
		var errs []error
		for _, n := range names {
			errs = append(errs, removeAll(d, n, depth))
		}
		if err := errors.Join(errs...); err != nil {
			return err
		}
	}
	return fmt.Errorf("%s: keeps filling while it is emptied", d.Name())
}
