package checkpoint

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/internal/confine"
)

// ErrCorrupt is an image that does not match the manifest (or cannot be read to check it).
var ErrCorrupt = errors.New("corrupt checkpoint")

// smallImage is the size up to which ImagesAt verifies an image whole in memory before serving
// it (every image but the pages of a process with some memory: files.img, core-*.img, …).
const smallImage = 32 << 20

// ImagesAt serves the images of checkpoint d, checked by CheckAt (m, authenticated), to a
// streamed restore. Every byte it returns was verified against m first: the checkpoint volume
// stays writable by the pod, which could change an image between a check and CRIU's read. An
// image up to smallImage is read whole into memory and verified there; a larger one is copied,
// verified, into priv (a directory of the agent's own, out of the pod's reach) and served from
// that copy, which is unlinked at once. (The pack of issue 16 verifies per chunk and needs no
// copy.)
func ImagesAt(d *os.File, m *Manifest, priv *os.File) ImageSource {
	files := map[string]FileSum{}
	for _, f := range m.Files {
		if name, ok := strings.CutPrefix(f.Path, ImagesDir+"/"); ok && !strings.Contains(name, "/") {
			files[name] = f
		}
	}
	return &verifiedImages{d: d, files: files, priv: priv}
}

type verifiedImages struct {
	d     *os.File
	files map[string]FileSum
	priv  *os.File
}

func (v *verifiedImages) Names() []string {
	out := make([]string, 0, len(v.files))
	for n := range v.files {
		out = append(out, n)
	}
	return out
}

func (v *verifiedImages) Open(name string) (io.ReadCloser, error) {
	f, ok := v.files[name]
	if !ok {
		return nil, fmt.Errorf("image %s: %w", name, fs.ErrNotExist)
	}
	if f.Size <= smallImage {
		var b bytes.Buffer
		b.Grow(int(f.Size))
		if err := readVerified(v.d, f, &b); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
		}
		return io.NopCloser(bytes.NewReader(b.Bytes())), nil
	}
	if err := copyVerified(v.d, f, v.priv); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	base := path.Base(f.Path)
	c, err := confine.OpenEntry(v.priv, base, unix.O_RDONLY)
	if err == nil {
		err = unix.Unlinkat(int(v.priv.Fd()), base, 0)
	}
	if err != nil {
		if c != nil {
			c.Close()
		}
		return nil, fmt.Errorf("image %s: private copy: %w", name, err)
	}
	return c, nil
}
