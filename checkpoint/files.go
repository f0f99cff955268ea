package checkpoint

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"
)

// CopyIn copies the checkpoint-files paths (absolute, as seen in the container) from the container
// whose root is visible at root (e.g. /proc/<pid>/root) into ckpt/files/. Symlinks in a path are
// resolved inside root, never on the host: the agent is privileged and the container's files are
// not trusted. A path that does not exist is recorded as missing (the app may not have created it
// yet).
func CopyIn(root string, paths []string, ckpt string) ([]CopiedFile, error) {
	var out []CopiedFile
	for _, p := range paths {
		if !path.IsAbs(p) {
			return nil, fmt.Errorf("checkpoint file %q: not an absolute path", p)
		}
		clean := path.Clean(p)
		src, err := ResolveIn(root, clean)
		if errors.Is(err, fs.ErrNotExist) {
			out = append(out, CopiedFile{Path: clean, Missing: true})
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("checkpoint file %s: %w", clean, err)
		}
		stored := StoredPath(clean)
		if err := copyTree(src, filepath.Join(ckpt, filepath.FromSlash(stored))); err != nil {
			return nil, fmt.Errorf("checkpoint file %s: %w", clean, err)
		}
		out = append(out, CopiedFile{Path: clean, Stored: stored})
	}
	return out, nil
}

// PutBack copies the checkpoint's files back to their places below root ("/" inside the
// container), replacing what is there.
func PutBack(ckpt string, m *Manifest, root string) error {
	for _, c := range m.CopiedFiles {
		if c.Missing || c.Stored == "" {
			continue
		}
		if !safeRel(c.Stored) {
			return fmt.Errorf("checkpoint file %s: stored path %q escapes the checkpoint", c.Path, c.Stored)
		}
		dst := filepath.Join(root, filepath.FromSlash(c.Path))
		if err := os.RemoveAll(dst); err != nil {
			return fmt.Errorf("checkpoint file %s: %w", c.Path, err)
		}
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return fmt.Errorf("checkpoint file %s: %w", c.Path, err)
		}
		if err := copyTree(filepath.Join(ckpt, filepath.FromSlash(c.Stored)), dst); err != nil {
			return fmt.Errorf("checkpoint file %s: %w", c.Path, err)
		}
	}
	return nil
}

// ResolveIn resolves an absolute path inside root the way the container would see it: symlinks
// (absolute or relative) are followed relative to root and never leave it.
func ResolveIn(root, p string) (string, error) {
	parts := strings.Split(strings.TrimPrefix(path.Clean(p), "/"), "/")
	cur := "/"
	for hops := 0; len(parts) > 0; {
		c := parts[0]
		parts = parts[1:]
		if c == "" || c == "." {
			continue
		}
		if c == ".." {
			cur = path.Dir(cur)
			continue
		}
		next := path.Join(cur, c)
		fi, err := os.Lstat(filepath.Join(root, next))
		if err != nil {
			return "", err
		}
		if fi.Mode()&fs.ModeSymlink == 0 {
			cur = next
			continue
		}
		if hops++; hops > 40 {
			return "", fmt.Errorf("too many symlinks")
		}
		target, err := os.Readlink(filepath.Join(root, next))
		if err != nil {
			return "", err
		}
		if path.IsAbs(target) {
			cur = "/"
		}
		parts = append(strings.Split(strings.TrimPrefix(target, "/"), "/"), parts...)
	}
	return filepath.Join(root, cur), nil
}

// copyTree copies a file, symlink or directory (recursively, symlinks kept as symlinks).
func copyTree(src, dst string) (err error) {
	fi, err := os.Lstat(src)
	if err != nil {
		return err
	}
	// Keep the owner (the app may run as another user than the agent or launcher).
	defer func() {
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && err == nil && os.Geteuid() == 0 {
			err = os.Lchown(dst, int(st.Uid), int(st.Gid))
		}
	}()
	switch {
	case fi.Mode()&fs.ModeSymlink != 0:
		t, err := os.Readlink(src)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
			return err
		}
		return os.Symlink(t, dst)
	case fi.IsDir():
		if err := os.MkdirAll(dst, fi.Mode().Perm()|0o700); err != nil {
			return err
		}
		des, err := os.ReadDir(src)
		if err != nil {
			return err
		}
		for _, de := range des {
			if err := copyTree(filepath.Join(src, de.Name()), filepath.Join(dst, de.Name())); err != nil {
				return err
			}
		}
		return os.Chmod(dst, fi.Mode().Perm())
	case fi.Mode().IsRegular():
		if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
			return err
		}
		in, err := os.Open(src)
		if err != nil {
			return err
		}
		defer in.Close()
		out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, fi.Mode().Perm())
		if err != nil {
			return err
		}
		if _, err := io.Copy(out, in); err != nil {
			out.Close()
			return err
		}
		if err := out.Close(); err != nil {
			return err
		}
		return os.Chtimes(dst, fi.ModTime(), fi.ModTime())
	default:
		return fmt.Errorf("%s: unsupported file type %s", src, fi.Mode().Type())
	}
}
