package main

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"go.yaml.in/yaml/v3"

	"github.com/stasis-k8s/stasis/wiring"
)

// Paths inside the images (wiring.ImageBinary and the agent's --criu-path; the Dockerfile uses the
// same).
const (
	ImageBinary = wiring.ImageBinary
	ImageCriu   = "/usr/local/lib/stasis/criu"
	// NonRootUID is the webhook's user (distroless' "nonroot"; the Deployment's runAsUser).
	NonRootUID = 65532
)

// HostTools are copied with their shared libraries into the agent image: the CRIU wrapper (for
// people debugging on a node; the agent starts CRIU itself, see criurun.Bundle) is a sh script
// using readlink and dirname, and nsenter helps the same people.
var HostTools = []string{"nsenter", "sh", "readlink", "dirname"}

// Options says what to build.
type Options struct {
	OutDir        string
	Stasis        string
	CriuDir       string
	Kustomization string
	WebhookRef    string
	AgentRef      string
	// Epoch is the timestamp of every file and of the images (SOURCE_DATE_EPOCH, else 0).
	Epoch time.Time
}

// Built is one image tarball.
type Built struct {
	Ref    string
	File   string
	Digest v1.Hash
}

// Build writes stasis-webhook.tar and stasis-agent.tar into opts.OutDir.
func Build(opts Options) ([]Built, error) {
	if err := opts.defaults(); err != nil {
		return nil, err
	}
	if err := checkStatic(opts.Stasis); err != nil {
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(opts.CriuDir, "criu")); err != nil {
		return nil, fmt.Errorf("--criu-dir %s: no CRIU wrapper (%v): run `make criu` (hack/criu/install.sh)", opts.CriuDir, err)
	}
	if _, err := os.Stat(filepath.Join(opts.CriuDir, "nsjoin.so")); err != nil {
		return nil, fmt.Errorf("--criu-dir %s: no nsjoin.so (%v): run `make criu` (hack/criu/install.sh)", opts.CriuDir, err)
	}
	if _, err := os.Stat(filepath.Join(opts.CriuDir, "root", "usr", "sbin", "criu")); err != nil {
		return nil, fmt.Errorf("--criu-dir %s: no unpacked CRIU in root/ (%v): run `make criu`", opts.CriuDir, err)
	}
	if err := os.MkdirAll(opts.OutDir, 0o755); err != nil {
		return nil, err
	}
	webhook, err := opts.webhookImage()
	if err != nil {
		return nil, fmt.Errorf("webhook image: %w", err)
	}
	agent, err := opts.agentImage()
	if err != nil {
		return nil, fmt.Errorf("agent image: %w", err)
	}
	var out []Built
	for _, im := range []struct {
		ref, file string
		img       v1.Image
	}{
		{opts.WebhookRef, "stasis-webhook.tar", webhook},
		{opts.AgentRef, "stasis-agent.tar", agent},
	} {
		tag, err := name.NewTag(im.ref)
		if err != nil {
			return nil, fmt.Errorf("image name %q: %w", im.ref, err)
		}
		file := filepath.Join(opts.OutDir, im.file)
		if err := tarball.WriteToFile(file+".tmp", tag, im.img); err != nil {
			return nil, fmt.Errorf("writing %s: %w", file, err)
		}
		if err := os.Rename(file+".tmp", file); err != nil {
			return nil, err
		}
		d, err := im.img.Digest()
		if err != nil {
			return nil, err
		}
		out = append(out, Built{Ref: tag.String(), File: file, Digest: d})
	}
	return out, nil
}

func (o *Options) defaults() error {
	if o.Epoch.IsZero() {
		o.Epoch = time.Unix(0, 0).UTC()
		if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
			n, err := strconv.ParseInt(s, 10, 64)
			if err != nil {
				return fmt.Errorf("$SOURCE_DATE_EPOCH %q: not a number of seconds", s)
			}
			o.Epoch = time.Unix(n, 0).UTC()
		}
	}
	if o.WebhookRef != "" && o.AgentRef != "" {
		return nil
	}
	refs, err := ImageRefs(o.Kustomization)
	if err != nil {
		return err
	}
	if o.WebhookRef == "" {
		o.WebhookRef = refs["stasis-webhook"]
	}
	if o.AgentRef == "" {
		o.AgentRef = refs["stasis-agent"]
	}
	if o.WebhookRef == "" || o.AgentRef == "" {
		return fmt.Errorf("%s: `images:` must set stasis-webhook and stasis-agent", o.Kustomization)
	}
	return nil
}

// ImageRefs reads the `images:` of a kustomization: image name → newName:newTag.
func ImageRefs(kustomization string) (map[string]string, error) {
	data, err := os.ReadFile(kustomization)
	if err != nil {
		return nil, fmt.Errorf("image names: %w (or give --webhook-image and --agent-image)", err)
	}
	var k struct {
		Images []struct {
			Name    string `yaml:"name"`
			NewName string `yaml:"newName"`
			NewTag  string `yaml:"newTag"`
		} `yaml:"images"`
	}
	if err := yaml.Unmarshal(data, &k); err != nil {
		return nil, fmt.Errorf("%s: %w", kustomization, err)
	}
	refs := map[string]string{}
	for _, im := range k.Images {
		n := im.NewName
		if n == "" {
			n = im.Name
		}
		tag := im.NewTag
		if tag == "" {
			tag = "latest"
		}
		refs[im.Name] = n + ":" + tag
	}
	return refs, nil
}

func checkStatic(bin string) error {
	f, err := elf.Open(bin)
	if err != nil {
		return fmt.Errorf("--stasis %s: %w: run `make build`", bin, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("--stasis %s is dynamically linked: build it with CGO_ENABLED=0 (`make build`), the webhook image has no libc", bin)
		}
	}
	return nil
}

func (o *Options) config(entrypoint, cmd []string, user string) v1.Config {
	return v1.Config{
		Entrypoint: entrypoint,
		Cmd:        cmd,
		User:       user,
		WorkingDir: "/",
		Env:        []string{"PATH=/usr/local/bin:/usr/bin:/bin"},
		Labels: map[string]string{
			"org.opencontainers.image.source": "https://github.com/stasis-k8s/stasis",
			"org.opencontainers.image.title":  "stasis",
		},
	}
}

func (o *Options) image(cfg v1.Config, layers ...*layerBuilder) (v1.Image, error) {
	img := empty.Image
	for _, lb := range layers {
		l, err := lb.layer()
		if err != nil {
			return nil, err
		}
		if img, err = mutate.Append(img, mutate.Addendum{Layer: l, History: v1.History{
			Created: v1.Time{Time: o.Epoch}, CreatedBy: "hack/image: " + lb.what,
		}}); err != nil {
			return nil, err
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.Architecture = runtime.GOARCH
	cf.OS = "linux"
	cf.Created = v1.Time{Time: o.Epoch}
	cf.Config = cfg
	return mutate.ConfigFile(img, cf)
}

func (o *Options) webhookImage() (v1.Image, error) {
	base := o.newLayer("minimal non-root rootfs")
	base.baseFiles()
	bin := o.newLayer("stasis binary")
	if err := bin.file(ImageBinary, o.Stasis, 0o755); err != nil {
		return nil, err
	}
	uid := strconv.Itoa(NonRootUID)
	return o.image(o.config([]string{ImageBinary}, []string{"webhook"}, uid+":"+uid), base, bin)
}

func (o *Options) agentImage() (v1.Image, error) {
	base := o.newLayer("minimal rootfs: " + strings.Join(HostTools, ", ") + " and their libraries")
	base.baseFiles()
	if err := base.hostTools(HostTools); err != nil {
		return nil, err
	}
	criu := o.newLayer("CRIU 4.2 bundle")
	if err := criu.file(ImageCriu+"/criu", filepath.Join(o.CriuDir, "criu"), 0o755); err != nil {
		return nil, err
	}
	if err := criu.file(ImageCriu+"/nsjoin.so", filepath.Join(o.CriuDir, "nsjoin.so"), 0o644); err != nil {
		return nil, err
	}
	criu.dir(ImageCriu+"/plugins", 0o755)
	if err := criu.tree(ImageCriu+"/root", filepath.Join(o.CriuDir, "root"), []string{"usr/share/doc", "usr/share/man", "usr/share/lintian", "usr/share/locale"}); err != nil {
		return nil, err
	}
	bin := o.newLayer("stasis binary")
	if err := bin.file(ImageBinary, o.Stasis, 0o755); err != nil {
		return nil, err
	}
	return o.image(o.config([]string{ImageBinary}, []string{"agent"}, "0:0"), base, criu, bin)
}

// layerBuilder collects the entries of one layer; written sorted, with fixed metadata.
type layerBuilder struct {
	what    string
	epoch   time.Time
	entries map[string]*entry
}

type entry struct {
	hdr  tar.Header
	data []byte
}

func (o *Options) newLayer(what string) *layerBuilder {
	return &layerBuilder{what: what, epoch: o.Epoch, entries: map[string]*entry{}}
}

func (l *layerBuilder) add(p string, hdr tar.Header, data []byte) {
	p = strings.TrimPrefix(path.Clean("/"+p), "/")
	for d := path.Dir(p); d != "." && d != "/"; d = path.Dir(d) {
		if _, ok := l.entries[d]; !ok {
			l.entries[d] = &entry{hdr: tar.Header{Typeflag: tar.TypeDir, Mode: 0o755}}
		}
	}
	hdr.Name = p
	l.entries[p] = &entry{hdr: hdr, data: data}
}

func (l *layerBuilder) dir(p string, mode int64) {
	l.add(p, tar.Header{Typeflag: tar.TypeDir, Mode: mode}, nil)
}

func (l *layerBuilder) symlink(p, target string) {
	l.add(p, tar.Header{Typeflag: tar.TypeSymlink, Linkname: target, Mode: 0o777}, nil)
}

func (l *layerBuilder) content(p string, data []byte, mode int64) {
	l.add(p, tar.Header{Typeflag: tar.TypeReg, Mode: mode, Size: int64(len(data))}, data)
}

func (l *layerBuilder) file(p, src string, mode int64) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	l.content(p, data, mode)
	return nil
}

// tree copies a host directory, keeping symlinks as symlinks and file modes.
func (l *layerBuilder) tree(dst, src string, skip []string) error {
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		for _, s := range skip {
			if rel == s {
				return filepath.SkipDir
			}
		}
		target := path.Join(dst, filepath.ToSlash(rel))
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.Type()&fs.ModeSymlink != 0:
			ln, err := os.Readlink(p)
			if err != nil {
				return err
			}
			l.symlink(target, ln)
		case d.IsDir():
			l.dir(target, int64(info.Mode().Perm()))
		case info.Mode().IsRegular():
			return l.file(target, p, int64(info.Mode().Perm()))
		}
		return nil
	})
}

// baseFiles is the skeleton both images share: merged-/usr links, users, /tmp.
func (l *layerBuilder) baseFiles() {
	for _, d := range []string{"bin", "lib", "lib64", "sbin"} {
		l.symlink(d, "usr/"+d)
		l.dir("usr/"+d, 0o755)
	}
	l.dir("tmp", 0o1777)
	l.dir("etc", 0o755)
	l.dir("proc", 0o755)
	l.dir("dev", 0o755)
	l.dir("run", 0o755)
	l.content("etc/passwd", []byte(fmt.Sprintf("root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:%d:%d:nonroot:/home/nonroot:/sbin/nologin\n", NonRootUID, NonRootUID)), 0o644)
	l.content("etc/group", []byte(fmt.Sprintf("root:x:0:\nnonroot:x:%d:\n", NonRootUID)), 0o644)
	l.dir("root", 0o700)
	l.add("home/nonroot", tar.Header{Typeflag: tar.TypeDir, Mode: 0o700, Uid: NonRootUID, Gid: NonRootUID}, nil)
}

// hostTools copies programs from this machine's PATH to /usr/bin with the shared libraries they
// load (DT_NEEDED, transitively) and their ELF interpreter.
func (l *layerBuilder) hostTools(tools []string) error {
	libs := map[string]string{} // image path → host path
	for _, t := range tools {
		hp, err := lookPath(t)
		if err != nil {
			return err
		}
		if err := l.file("usr/bin/"+t, hp, 0o755); err != nil {
			return err
		}
		if err := elfDeps(hp, libs); err != nil {
			return fmt.Errorf("%s: %w", hp, err)
		}
	}
	for ip, hp := range libs {
		if err := l.file(ip, hp, 0o755); err != nil {
			return err
		}
	}
	return nil
}

func lookPath(t string) (string, error) {
	for _, d := range []string{"/usr/bin", "/usr/sbin", "/bin", "/sbin"} {
		p := filepath.Join(d, t)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return filepath.EvalSymlinks(p)
		}
	}
	return "", fmt.Errorf("%s not found on this machine: run `make deps`", t)
}

var libDirs = []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib",
	"/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu"}

// usrPath maps a path to where it lives in the merged-/usr image (/lib64/x → usr/lib64/x).
func usrPath(p string) string {
	p = strings.TrimPrefix(path.Clean(p), "/")
	for _, d := range []string{"bin/", "lib/", "lib64/", "sbin/"} {
		if strings.HasPrefix(p, d) {
			return "usr/" + p
		}
	}
	return p
}

func elfDeps(bin string, libs map[string]string) error {
	f, err := elf.Open(bin)
	if err != nil {
		return err
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type != elf.PT_INTERP {
			continue
		}
		b, err := io.ReadAll(p.Open())
		if err != nil {
			return err
		}
		interp := strings.TrimRight(string(b), "\x00")
		hp, err := filepath.EvalSymlinks(interp)
		if err != nil {
			return fmt.Errorf("interpreter %s: %w", interp, err)
		}
		libs[usrPath(interp)] = hp
	}
	needed, err := f.ImportedLibraries()
	if err != nil {
		return err
	}
	for _, n := range needed {
		found := ""
		for _, d := range libDirs {
			if _, err := os.Stat(filepath.Join(d, n)); err == nil {
				found = filepath.Join(d, n)
				break
			}
		}
		if found == "" {
			return fmt.Errorf("shared library %s not found in %v", n, libDirs)
		}
		ip := usrPath(found)
		if _, seen := libs[ip]; seen {
			continue
		}
		hp, err := filepath.EvalSymlinks(found)
		if err != nil {
			return err
		}
		libs[ip] = hp
		if err := elfDeps(hp, libs); err != nil {
			return err
		}
	}
	return nil
}

func (l *layerBuilder) layer() (v1.Layer, error) {
	names := make([]string, 0, len(l.entries))
	for n := range l.entries {
		names = append(names, n)
	}
	sort.Strings(names)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, n := range names {
		e := l.entries[n]
		h := e.hdr
		if h.Typeflag == tar.TypeDir {
			h.Name += "/"
		}
		h.ModTime = l.epoch
		if h.Uid == 0 {
			h.Uname, h.Gname = "root", "root"
		}
		if err := tw.WriteHeader(&h); err != nil {
			return nil, err
		}
		if len(e.data) > 0 {
			if _, err := tw.Write(e.data); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	data := buf.Bytes()
	if len(data) == 0 {
		return nil, errors.New("empty layer")
	}
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(data)), nil
	})
}
