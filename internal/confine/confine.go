// Package confine resolves paths inside a directory taken as a root, the way a process chrooted
// there would see them, and never outside it.
//
// The agent is root on the node and works on trees a pod can change while it works: a container's
// root (/proc/<pid>/root) and the checkpoint volume. Resolving such a path by string (Lstat, then
// open) is check-then-use: a process of the pod that is not frozen can swap a component for a
// symlink in between. Worse, an absolute symlink met while walking /proc/<pid>/root/... by path
// resolves against the agent's root, the host's. So every path is resolved once, by the kernel,
// with openat2(RESOLVE_IN_ROOT|RESOLVE_NO_MAGICLINKS) relative to a descriptor of the root, and
// everything after that open works on descriptors (Fstat, Fchown, Openat/Mkdirat/Unlinkat relative
// to a directory descriptor): there is no second lookup by path to race with.
package confine

import (
	"errors"
	"fmt"
	"os"
	"path"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrUnsupported means the kernel has no openat2(2) (Linux 5.6 and later have it): there is no way
// to resolve a path inside a root without racing with the tree's owner, so nothing is resolved.
var ErrUnsupported = errors.New("the kernel lacks openat2(2) (Linux 5.6+ needed): confined path resolution is impossible, refusing to resolve paths in untrusted trees")

// Resolve flags. InRoot is how a path in a container is resolved: ".." stops at the root, absolute
// symlinks start from it, and /proc/<pid>/root-like magic links (which jump anywhere) are refused.
// Beneath is for trees the agent created: no symlink at all, no mount crossed.
const (
	inRoot  = unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS
	beneath = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_NO_XDEV
)

// openat2 retries EAGAIN (the kernel asks for a retry when a rename or mount raced with a ".."
// lookup under RESOLVE_IN_ROOT/BENEATH) and EINTR a bounded number of times.
func openat2(dir *os.File, p string, flags int, mode uint32, resolve uint64) (*os.File, error) {
	how := unix.OpenHow{Flags: uint64(flags | unix.O_CLOEXEC), Mode: uint64(mode), Resolve: resolve}
	var fd int
	var err error
	for range 128 {
		fd, err = unix.Openat2(int(dir.Fd()), p, &how)
		if err != unix.EAGAIN && err != unix.EINTR {
			break
		}
	}
	if err == unix.ENOSYS {
		return nil, ErrUnsupported
	}
	if err != nil {
		return nil, &os.PathError{Op: "openat2", Path: join(dir.Name(), p), Err: err}
	}
	return os.NewFile(uintptr(fd), join(dir.Name(), p)), nil
}

func join(dir, p string) string {
	if p == "." {
		return dir
	}
	if path.IsAbs(p) {
		return dir + p
	}
	return dir + "/" + p
}

// OpenRoot opens the directory at p (a trusted path such as /proc/<pid>/root) to serve as a root
// for Open and MkdirAll. It is an O_PATH descriptor: it reads nothing, it only anchors lookups.
func OpenRoot(p string) (*os.File, error) {
	fd, err := unix.Open(p, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: p, Err: err}
	}
	return os.NewFile(uintptr(fd), p), nil
}

// Open opens p inside root: absolute or relative, p is resolved as if root were "/" (".." never
// leaves it, absolute symlinks start from it, magic links are refused). Add O_NOFOLLOW to flags
// where the last component must not be a symlink (O_PATH|O_NOFOLLOW opens the symlink itself).
func Open(root *os.File, p string, flags int) (*os.File, error) {
	if p == "" {
		p = "/"
	}
	return openat2(root, p, flags, 0, inRoot)
}

// OpenBeneath opens rel below dir, a tree the agent created: no symlink anywhere in rel, no ".."
// above dir, no mount crossed. A symlink swapped in by someone else fails the open (ELOOP).
func OpenBeneath(dir *os.File, rel string, flags int) (*os.File, error) {
	return openat2(dir, rel, flags|unix.O_NOFOLLOW, 0, beneath)
}

// OpenEntry opens one entry (a single name, as read from the directory) of dir without following
// it: a symlink yields an O_PATH descriptor of the symlink itself when flags has O_PATH, ELOOP
// otherwise.
func OpenEntry(dir *os.File, name string, flags int) (*os.File, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	fd, err := unix.Openat(int(dir.Fd()), name, flags|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "openat", Path: join(dir.Name(), name), Err: err}
	}
	return os.NewFile(uintptr(fd), join(dir.Name(), name)), nil
}

// CreateEntry creates the regular file name in dir, which must not exist (O_EXCL never follows a
// symlink either).
func CreateEntry(dir *os.File, name string, mode uint32) (*os.File, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	fd, err := unix.Openat(int(dir.Fd()), name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, mode)
	if err != nil {
		return nil, &os.PathError{Op: "create", Path: join(dir.Name(), name), Err: err}
	}
	return os.NewFile(uintptr(fd), join(dir.Name(), name)), nil
}

// Reopen opens again the very file an O_PATH descriptor refers to, for reading or writing. It
// goes through /proc/self/fd, whose magic link names that inode and nothing else: no path is
// looked up again.
func Reopen(f *os.File, flags int) (*os.File, error) {
	fd, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", f.Fd()), flags|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "reopen", Path: f.Name(), Err: err}
	}
	return os.NewFile(uintptr(fd), f.Name()), nil
}

// Stat is fstat(2) of f.
func Stat(f *os.File) (unix.Stat_t, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return st, &os.PathError{Op: "fstat", Path: f.Name(), Err: err}
	}
	return st, nil
}

// Lstat is fstatat(dir, name, AT_SYMLINK_NOFOLLOW): a symlink is reported as one.
func Lstat(dir *os.File, name string) (unix.Stat_t, error) {
	var st unix.Stat_t
	if err := unix.Fstatat(int(dir.Fd()), name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return st, &os.PathError{Op: "lstat", Path: join(dir.Name(), name), Err: err}
	}
	return st, nil
}

// Same reports whether two stats are of the same inode.
func Same(a, b *unix.Stat_t) bool { return a.Dev == b.Dev && a.Ino == b.Ino }

// IsDir, IsReg and IsLink tell a Stat_t's file type.
func IsDir(st *unix.Stat_t) bool { return st.Mode&unix.S_IFMT == unix.S_IFDIR }

// IsDir, IsReg and IsLink tell an Entry's type.
func (e *Entry) IsDir() bool      { return IsDir(&e.Stat_t) }
func (e *Entry) IsReg() bool      { return IsReg(&e.Stat_t) }
func (e *Entry) IsLink() bool     { return IsLink(&e.Stat_t) }
func IsReg(st *unix.Stat_t) bool  { return st.Mode&unix.S_IFMT == unix.S_IFREG }
func IsLink(st *unix.Stat_t) bool { return st.Mode&unix.S_IFMT == unix.S_IFLNK }

// ReadDirNames lists dir (any descriptor of a directory, O_PATH included) through a fresh
// descriptor of the same directory, so that concurrent listings do not share an offset.
func ReadDirNames(dir *os.File) ([]string, error) {
	d, err := openat2(dir, ".", unix.O_RDONLY|unix.O_DIRECTORY, 0, beneath)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	return d.Readdirnames(-1)
}

// Entry is a directory entry and its lstat.
type Entry struct {
	Name string
	unix.Stat_t
}

// ReadDir lists dir with an fstatat(AT_SYMLINK_NOFOLLOW) of every entry (entries removed
// meanwhile are left out). The type comes from that stat, never from a lookup by path (which
// os.File.ReadDir does on filesystems without d_type).
func ReadDir(dir *os.File) ([]Entry, error) {
	names, err := ReadDirNames(dir)
	if err != nil {
		return nil, err
	}
	out := make([]Entry, 0, len(names))
	for _, n := range names {
		st, err := Lstat(dir, n)
		if errors.Is(err, unix.ENOENT) {
			continue
		}
		if err != nil {
			return nil, err
		}
		out = append(out, Entry{Name: n, Stat_t: st})
	}
	return out, nil
}

// checkName refuses anything but a single directory entry name.
func checkName(name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") {
		return fmt.Errorf("%q: not a single file name", name)
	}
	return nil
}

// Mkdirat creates the directory name in dir (an existing one is fine) and opens it, refusing a
// symlink or a mount point in its place.
func Mkdirat(dir *os.File, name string, perm uint32) (*os.File, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	if err := unix.Mkdirat(int(dir.Fd()), name, perm); err != nil && err != unix.EEXIST {
		return nil, &os.PathError{Op: "mkdirat", Path: join(dir.Name(), name), Err: err}
	}
	return openat2(dir, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0, beneath)
}

// MkdirAll creates the directory p inside root (resolved as Open does, symlinks of the tree
// followed inside root) and returns it open for reading. Each missing component is created with
// mkdirat relative to its parent's descriptor; each prefix is resolved again from root, so a
// component swapped for a symlink meanwhile still resolves inside root.
func MkdirAll(root *os.File, p string, perm uint32) (*os.File, error) {
	clean := path.Clean("/" + p)
	d, err := Open(root, clean, unix.O_RDONLY|unix.O_DIRECTORY)
	if err == nil || !errors.Is(err, unix.ENOENT) || clean == "/" {
		return d, err
	}
	parent, err := MkdirAll(root, path.Dir(clean), perm)
	if err != nil {
		return nil, err
	}
	defer parent.Close()
	name := path.Base(clean)
	if err := unix.Mkdirat(int(parent.Fd()), name, perm); err != nil && err != unix.EEXIST {
		return nil, &os.PathError{Op: "mkdirat", Path: join(root.Name(), clean), Err: err}
	}
	return Open(root, clean, unix.O_RDONLY|unix.O_DIRECTORY)
}

// MkdirAllBeneath creates rel below dir, a tree the agent created, refusing symlinks and mount
// points on the way, and returns it open for reading.
func MkdirAllBeneath(dir *os.File, rel string, perm uint32) (*os.File, error) {
	cur, err := OpenBeneath(dir, ".", unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return nil, err
	}
	for _, c := range strings.Split(rel, "/") {
		if c == "" || c == "." {
			continue
		}
		next, err := Mkdirat(cur, c, perm)
		cur.Close()
		if err != nil {
			return nil, err
		}
		cur = next
	}
	return cur, nil
}
