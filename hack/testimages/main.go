// Command testimages builds the container images the local test cluster needs without Docker or a
// registry: a static pause binary (containerd's sandbox image) and the counter application the
// end-to-end scenarios checkpoint. Each image is one layer holding a static binary (plus /tmp and a
// minimal /etc), assembled with go-containerregistry into a docker-archive tarball that
// `ctr -n k8s.io images import` accepts.
//
// The tarballs are cached under $STASIS_CACHE/testimages/<hash of this folder's sources>/; the
// command prints that folder. Usage: go run ./hack/testimages [-out DIR]
//
// With -apps it builds the application images of the e2e matrix instead (debian.go: a root
// filesystem from Debian packages) and prints their tarball.
package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Image names; tests/cluster and the e2e scenarios use the same strings.
const (
	PauseImage   = "stasis.local/pause:3.10"
	CounterImage = "stasis.local/counter:v1"
	// CounterImageV2 is the same program in another image (its config differs, so does its
	// digest): a checkpoint of one must not be restored into a container of the other.
	CounterImageV2 = "stasis.local/counter:v2"
)

type image struct {
	ref        string
	file       string   // tarball name in the output folder
	pkg        string   // Go package of the binary, relative to this folder
	binary     string   // path of the binary in the image
	entrypoint []string // image config
	cmd        []string
	env        []string // besides PATH
}

var images = []image{
	{ref: PauseImage, file: "pause.tar", pkg: "./pause", binary: "/pause", entrypoint: []string{"/pause"}},
	// Pods that set no command run the entrypoint from this config (scenario 4).
	{ref: CounterImage, file: "counter.tar", pkg: "./counter", binary: "/counter",
		entrypoint: []string{"/counter"}, cmd: []string{"--interval=500ms"}},
	{ref: CounterImageV2, file: "counter-v2.tar", pkg: "./counter", binary: "/counter",
		entrypoint: []string{"/counter"}, cmd: []string{"--interval=500ms"}, env: []string{"COUNTER_IMAGE=v2"}},
}

func main() {
	out := flag.String("out", "", "output folder (default: $STASIS_CACHE/testimages/<source hash>)")
	apps := flag.Bool("apps", false, "build the application images of the e2e matrix from Debian packages instead, print their tarball")
	flag.Parse()
	if *apps {
		src, err := sourceDir()
		if err == nil {
			var tarball string
			if tarball, err = buildApps(src, cacheDir()); err == nil {
				fmt.Println(tarball)
				return
			}
		}
		fmt.Fprintln(os.Stderr, "testimages:", err)
		os.Exit(1)
	}
	if err := run(*out); err != nil {
		fmt.Fprintln(os.Stderr, "testimages:", err)
		os.Exit(1)
	}
}

func run(out string) error {
	src, err := sourceDir()
	if err != nil {
		return err
	}
	if out == "" {
		sum, err := hashSources(src)
		if err != nil {
			return err
		}
		out = filepath.Join(cacheDir(), "testimages", sum[:16])
	}
	if complete(out) {
		fmt.Println(out)
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(out), ".testimages-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	for _, im := range images {
		bin := filepath.Join(tmp, filepath.Base(im.binary))
		build := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, im.pkg)
		build.Dir, build.Stdout, build.Stderr = src, os.Stderr, os.Stderr
		build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH)
		if err := build.Run(); err != nil {
			return fmt.Errorf("build %s: %w", im.pkg, err)
		}
		if err := writeImage(im, bin, filepath.Join(tmp, im.file)); err != nil {
			return fmt.Errorf("%s: %w", im.ref, err)
		}
		os.Remove(bin)
	}
	if err := os.WriteFile(filepath.Join(tmp, "complete"), nil, 0o644); err != nil {
		return err
	}
	os.RemoveAll(out)
	if err := os.Rename(tmp, out); err != nil {
		return err
	}
	fmt.Println(out)
	return nil
}

func cacheDir() string {
	if c := os.Getenv("STASIS_CACHE"); c != "" {
		return c
	}
	return filepath.Join(os.Getenv("HOME"), ".cache", "stasis")
}

func complete(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, "complete"))
	return err == nil
}

// sourceDir is this command's folder (go run builds from the module, so find it from the cwd).
func sourceDir() (string, error) {
	for _, c := range []string{"hack/testimages", "."} {
		if _, err := os.Stat(filepath.Join(c, "counter", "main.go")); err == nil {
			return filepath.Abs(c)
		}
	}
	return "", fmt.Errorf("run from the repository root (hack/testimages not found)")
}

func hashSources(dir string) (string, error) {
	h := sha256.New()
	var files []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(p, ".go") {
			files = append(files, p)
		}
		return err
	})
	if err != nil {
		return "", err
	}
	sort.Strings(files)
	fmt.Fprintln(h, runtime.Version())
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(h, "%s %d\n", strings.TrimPrefix(f, dir), len(b))
		h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func writeImage(im image, bin, dest string) error {
	layerTar, err := rootfs(bin, im.binary)
	if err != nil {
		return err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	})
	if err != nil {
		return err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return err
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", runtime.GOARCH
	cfg.Created = v1.Time{Time: time.Unix(0, 0).UTC()}
	cfg.Config.Entrypoint = im.entrypoint
	cfg.Config.Cmd = im.cmd
	cfg.Config.Env = append([]string{"PATH=/usr/local/bin:/usr/bin:/bin"}, im.env...)
	cfg.Config.WorkingDir = "/"
	if img, err = mutate.ConfigFile(img, cfg); err != nil {
		return err
	}
	tag, err := name.NewTag(im.ref)
	if err != nil {
		return err
	}
	return tarball.WriteToFile(dest, tag, img)
}

// rootfs is the image's only layer: the binary, a writable /tmp and the few /etc files programs
// expect.
func rootfs(bin, inImage string) ([]byte, error) {
	data, err := os.ReadFile(bin)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	epoch := time.Unix(0, 0)
	dirs := []string{"etc", "tmp", "proc", "sys", "dev"}
	for _, d := range dirs {
		mode := int64(0o755)
		if d == "tmp" {
			mode = 0o1777
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: mode, ModTime: epoch}); err != nil {
			return nil, err
		}
	}
	files := []struct {
		name string
		mode int64
		data []byte
	}{
		{"etc/passwd", 0o644, []byte("root:x:0:0:root:/:/bin/false\nnobody:x:65534:65534:nobody:/:/bin/false\n")},
		{"etc/group", 0o644, []byte("root:x:0:\nnobody:x:65534:\n")},
		{strings.TrimPrefix(inImage, "/"), 0o755, data},
	}
	for _, f := range files {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: f.name, Mode: f.mode, Size: int64(len(f.data)), ModTime: epoch}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(f.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
