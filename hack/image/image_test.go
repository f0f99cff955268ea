package main

import (
	"archive/tar"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// criuDir is the bundle hack/criu/install.sh made ($STASIS_CRIU is its wrapper).
func criuDir(t *testing.T) string {
	t.Helper()
	if w := os.Getenv("STASIS_CRIU"); w != "" {
		return filepath.Dir(w)
	}
	cache := os.Getenv("STASIS_CACHE")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache", "stasis")
	}
	d := filepath.Join(cache, "criu")
	if _, err := os.Stat(filepath.Join(d, "criu")); err != nil {
		t.Fatalf("STASIS_CRIU not set and no CRIU bundle in %s: run `make unit` (it runs hack/criu/install.sh)", d)
	}
	return d
}

func buildStasis(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "stasis")
	cmd := exec.Command("go", "build", "-trimpath", "-o", bin, "../..")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	return bin
}

// extract unpacks an image's flattened filesystem into dir.
func extract(t *testing.T, img v1.Image, dir string) {
	t.Helper()
	rc := mutate.Extract(img)
	defer rc.Close()
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return
		}
		require.NoError(t, err)
		p := filepath.Join(dir, h.Name)
		switch h.Typeflag {
		case tar.TypeDir:
			require.NoError(t, os.MkdirAll(p, os.FileMode(h.Mode)&os.ModePerm))
		case tar.TypeSymlink:
			require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
			require.NoError(t, os.Symlink(h.Linkname, p))
		case tar.TypeReg:
			require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
			f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, os.FileMode(h.Mode)&os.ModePerm)
			require.NoError(t, err)
			_, err = io.Copy(f, tr)
			require.NoError(t, err)
			require.NoError(t, f.Close())
		}
	}
}

// chrootRun runs argv inside root as uid, the way a container runtime would start the image's
// process (minus namespaces): it proves the files and libraries in the image suffice.
func chrootRun(t *testing.T, root string, uid uint32, argv ...string) string {
	t.Helper()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin"}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: root, Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%v in the image: %s", argv, out)
	return string(out)
}

func TestBuildImages(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("TestBuildImages runs the images' programs in a chroot: run it as root (`make unit`)")
	}
	opts := Options{
		OutDir:        t.TempDir(),
		Stasis:        buildStasis(t),
		CriuDir:       criuDir(t),
		Kustomization: "../../deploy/base/kustomization.yaml",
	}
	built, err := Build(opts)
	require.NoError(t, err)
	require.Len(t, built, 2)

	refs, err := ImageRefs(opts.Kustomization)
	require.NoError(t, err)

	load := func(file, ref string) v1.Image {
		tag, err := name.NewTag(ref)
		require.NoError(t, err)
		img, err := tarball.ImageFromPath(file, &tag)
		require.NoError(t, err, "the tarball must carry the tag %s (what ctr import names the image)", ref)
		return img
	}

	t.Run("webhook", func(t *testing.T) {
		assert.Equal(t, refs["stasis-webhook"], built[0].Ref)
		img := load(built[0].File, built[0].Ref)
		cf, err := img.ConfigFile()
		require.NoError(t, err)
		assert.Equal(t, "65532:65532", cf.Config.User, "non-root")
		assert.Equal(t, []string{ImageBinary}, cf.Config.Entrypoint)
		assert.Equal(t, "linux", cf.OS)
		root := t.TempDir()
		extract(t, img, root)
		// Nothing but the binary and the skeleton: no shell, no libc.
		_, err = os.Stat(filepath.Join(root, "usr/bin/sh"))
		assert.True(t, os.IsNotExist(err), "the webhook image has no shell")
		out := chrootRun(t, root, NonRootUID, ImageBinary, "version")
		assert.NotEmpty(t, strings.TrimSpace(out))
	})

	t.Run("agent", func(t *testing.T) {
		assert.Equal(t, refs["stasis-agent"], built[1].Ref)
		img := load(built[1].File, built[1].Ref)
		cf, err := img.ConfigFile()
		require.NoError(t, err)
		assert.Equal(t, []string{ImageBinary}, cf.Config.Entrypoint)
		assert.Equal(t, []string{"agent"}, cf.Config.Cmd)
		root := t.TempDir()
		extract(t, img, root)
		chrootRun(t, root, 0, ImageBinary, "version")
		out := chrootRun(t, root, 0, "/usr/bin/nsenter", "--version")
		assert.Contains(t, out, "nsenter")
		// The CRIU wrapper: sh + readlink + dirname, then CRIU through its own loader.
		out = chrootRun(t, root, 0, ImageCriu+"/criu", "--version")
		assert.Contains(t, out, "Version: 4.")
	})

	t.Run("reproducible", func(t *testing.T) {
		again := opts
		again.OutDir = t.TempDir()
		built2, err := Build(again)
		require.NoError(t, err)
		for i := range built {
			assert.Equal(t, built[i].Digest, built2[i].Digest, "%s: same inputs, same image", built[i].Ref)
		}
	})
}

func TestBuildErrors(t *testing.T) {
	dir := t.TempDir()
	dyn := "/usr/bin/nsenter" // dynamically linked on every Debian
	tests := []struct {
		name string
		opts Options
		want string
	}{
		{"no binary", Options{OutDir: dir, Stasis: filepath.Join(dir, "none"), CriuDir: dir, WebhookRef: "a:1", AgentRef: "b:1"}, "make build"},
		{"dynamic binary", Options{OutDir: dir, Stasis: dyn, CriuDir: dir, WebhookRef: "a:1", AgentRef: "b:1"}, "CGO_ENABLED=0"},
		{"no kustomization", Options{OutDir: dir, Stasis: dyn, CriuDir: dir, Kustomization: filepath.Join(dir, "k.yaml")}, "--webhook-image"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Build(tc.opts)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}
