package main

import (
	"archive/tar"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// The application images of the e2e matrix: one root filesystem assembled from Debian packages of
// the machine's own suite (debian/rootfs.sh: private apt configuration, dpkg -x, no system-wide
// install) holding a JVM, Python, Redis, PostgreSQL, bash and gawk, and the apps of debian/apps/
// in /apps. Both references share that one layer; they differ in the image config only: the
// logger image runs its app as the entrypoint, so that a pod written without a command (the
// plain-pod example) runs it.
const (
	AppsImage   = "stasis.local/apps:bookworm"
	LoggerImage = "stasis.local/logger:bookworm"
	appsFile    = "apps.tar"
)

// buildApps returns the apps tarball, building it when the cache has none for the current inputs
// ($STASIS_CACHE/testimages/apps-<hash of debian/ and this file>/apps.tar).
func buildApps(src, cache string) (string, error) {
	sum, err := hashTree(filepath.Join(src, "debian"), filepath.Join(src, "debian.go"))
	if err != nil {
		return "", err
	}
	out := filepath.Join(cache, "testimages", "apps-"+sum[:16])
	if complete(out) {
		return filepath.Join(out, appsFile), nil
	}
	t0 := time.Now()
	tmp, err := os.MkdirTemp(filepath.Join(cache, "testimages"), ".apps-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	rootfs := filepath.Join(tmp, "rootfs")
	pkgs, err := readPackages(filepath.Join(src, "debian", "packages"))
	if err != nil {
		return "", err
	}
	sh := exec.Command(filepath.Join(src, "debian", "rootfs.sh"), append([]string{rootfs}, pkgs...)...)
	sh.Stdout, sh.Stderr = os.Stderr, os.Stderr
	if err := sh.Run(); err != nil {
		return "", fmt.Errorf("debian/rootfs.sh: %w", err)
	}
	if err := copyApps(filepath.Join(src, "debian", "apps"), filepath.Join(rootfs, "apps")); err != nil {
		return "", err
	}
	t1 := time.Now()
	if err := writeRootfsImages(rootfs, filepath.Join(tmp, appsFile)); err != nil {
		return "", err
	}
	fmt.Fprintf(os.Stderr, "testimages: apps image: rootfs %s, packed %s\n",
		t1.Sub(t0).Round(time.Second), time.Since(t1).Round(time.Second))
	if err := os.RemoveAll(rootfs); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(tmp, "complete"), nil, 0o644); err != nil {
		return "", err
	}
	os.RemoveAll(out)
	if err := os.Rename(tmp, out); err != nil {
		return "", err
	}
	return filepath.Join(out, appsFile), nil
}

func readPackages(file string) ([]string, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var pkgs []string
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			pkgs = append(pkgs, l)
		}
	}
	if len(pkgs) == 0 {
		return nil, fmt.Errorf("%s lists no package", file)
	}
	return pkgs, nil
}

// copyApps puts the apps' sources into the image, world-readable.
func copyApps(from, to string) error {
	if err := os.MkdirAll(to, 0o755); err != nil {
		return err
	}
	ents, err := os.ReadDir(from)
	if err != nil {
		return err
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(to, e.Name()), b, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// hashTree hashes the files below dir (and the extra files) by relative path and content.
func hashTree(dir string, extra ...string) (string, error) {
	var files []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			files = append(files, p)
		}
		return err
	})
	if err != nil {
		return "", err
	}
	sort.Strings(files)
	h := sha256.New()
	for _, f := range append(files, extra...) {
		b, err := os.ReadFile(f)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(h, "%s %d\n", strings.TrimPrefix(f, filepath.Dir(dir)), len(b))
		h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// writeRootfsImages packs rootfs into one layer and writes both references into one
// docker-archive tarball (the layer stored once).
func writeRootfsImages(rootfs, dest string) error {
	layerFile := dest + ".layer"
	if err := tarTree(rootfs, layerFile); err != nil {
		return err
	}
	defer os.Remove(layerFile)
	layer, err := tarball.LayerFromFile(layerFile, tarball.WithCompressionLevel(gzip.BestSpeed))
	if err != nil {
		return err
	}
	refs := map[name.Reference]v1.Image{}
	for _, im := range []struct {
		ref        string
		entrypoint []string
	}{
		{AppsImage, nil},
		{LoggerImage, []string{"python3", "/apps/logger.py"}},
	} {
		img, err := configured(layer, im.entrypoint)
		if err != nil {
			return err
		}
		tag, err := name.NewTag(im.ref)
		if err != nil {
			return err
		}
		refs[tag] = img
	}
	return tarball.MultiRefWriteToFile(dest, refs)
}

func configured(layer v1.Layer, entrypoint []string) (v1.Image, error) {
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return nil, err
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", runtime.GOARCH
	cfg.Created = v1.Time{Time: time.Unix(0, 0).UTC()}
	cfg.Config.Entrypoint = entrypoint
	if entrypoint == nil {
		cfg.Config.Cmd = []string{"bash"}
	}
	cfg.Config.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"}
	cfg.Config.WorkingDir = "/"
	return mutate.ConfigFile(img, cfg)
}

// tarTree writes dir as an uncompressed tar (owners, modes and symlinks as on disk; hard links
// stored as copies).
func tarTree(dir, dest string) error {
	f, err := os.Create(dest)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(f)
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		return addEntry(tw, dir, p)
	})
	if err == nil {
		err = tw.Close()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func addEntry(tw *tar.Writer, dir, p string) error {
	info, err := os.Lstat(p)
	if err != nil {
		return err
	}
	link := ""
	if info.Mode()&fs.ModeSymlink != 0 {
		if link, err = os.Readlink(p); err != nil {
			return err
		}
	}
	hdr, err := tar.FileInfoHeader(info, link)
	if err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	rel, _ := filepath.Rel(dir, p)
	hdr.Name = filepath.ToSlash(rel)
	if info.IsDir() {
		hdr.Name += "/"
	}
	if st, ok := info.Sys().(*syscall.Stat_t); ok {
		hdr.Uid, hdr.Gid = int(st.Uid), int(st.Gid)
	}
	hdr.Uname, hdr.Gname = "", ""
	if err := tw.WriteHeader(hdr); err != nil {
		return err
	}
	if !info.Mode().IsRegular() {
		return nil
	}
	in, err := os.Open(p)
	if err != nil {
		return err
	}
	defer in.Close()
	_, err = io.Copy(tw, in)
	return err
}
