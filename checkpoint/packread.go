package checkpoint

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/internal/confine"
)

// PackReader serves the packed images of a verified checkpoint: an ImageSource (sequential, read
// ahead on GOMAXPROCS goroutines) and an ImageReaderAt (random access, a few chunks cached). Each
// chunk is read through the chunk store's descriptor (no symlink followed), decrypted, decompressed
// and checked against its keyed hash before any of its bytes is returned; zero chunks are made
// here. The checkpoint volume stays writable by the pod: a chunk is read once into the agent's
// memory and checked there, so nothing can change between the check and the use.
type PackReader struct {
	pack *Pack
	// mu: reads (read ahead included) hold it shared while they use chunks; Close takes it.
	mu     sync.RWMutex
	chunks *os.File
	// files are the pack files opened so far, by id.
	filesMu sync.Mutex
	files   map[string]*os.File
	namer   chunkNamer
	keys    []*dataKey // as Pack.Keys
	byName  map[string]*PackedImage
}

var (
	_ ImageSource   = (*PackReader)(nil)
	_ ImageReaderAt = (*PackReader)(nil)
)

// OpenPack opens the pack of m, a manifest CheckAt verified with ring's manifest key, in dir: the
// container's checkpoint directory holding the checkpoint and the chunk store.
func OpenPack(dir *os.File, m *Manifest, ring *KeyRing) (*PackReader, error) {
	if ring == nil {
		return nil, errNoKeyRing
	}
	if m.Pack == nil {
		return nil, fmt.Errorf("checkpoint %s has no pack (its images are files)", m.ID)
	}
	if err := m.Pack.validate(); err != nil {
		return nil, err
	}
	r := &PackReader{pack: m.Pack, namer: ring.namer(m.Pack.Naming), byName: map[string]*PackedImage{}, files: map[string]*os.File{}}
	for _, wk := range m.Pack.Keys {
		dk, err := ring.unwrap(m.Pod.Namespace, wk)
		if err != nil {
			return nil, fmt.Errorf("checkpoint %s: %w", m.ID, err)
		}
		r.keys = append(r.keys, dk)
	}
	for i := range m.Pack.Images {
		r.byName[m.Pack.Images[i].Name] = &m.Pack.Images[i]
	}
	var err error
	if r.chunks, err = confine.OpenEntry(dir, chunksDir, unix.O_RDONLY|unix.O_DIRECTORY); err != nil {
		if !packAllZero(m.Pack) {
			return nil, fmt.Errorf("chunk store: %w", err)
		}
		r.chunks = nil
	}
	return r, nil
}

func packAllZero(p *Pack) bool {
	for _, img := range p.Images {
		for _, c := range img.Chunks {
			if c.Name != "" {
				return false
			}
		}
	}
	return true
}

// Close releases the chunk store's descriptor.
func (r *PackReader) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	for id, f := range r.files {
		f.Close()
		delete(r.files, id)
	}
	if r.chunks != nil {
		err := r.chunks.Close()
		r.chunks = nil
		return err
	}
	return nil
}

// Names implements ImageSource.
func (r *PackReader) Names() []string {
	out := make([]string, 0, len(r.pack.Images))
	for _, img := range r.pack.Images {
		out = append(out, img.Name)
	}
	return out
}

func (r *PackReader) image(name string) (*PackedImage, error) {
	img, ok := r.byName[name]
	if !ok {
		return nil, fmt.Errorf("image %s: not in the checkpoint: %w", name, os.ErrNotExist)
	}
	return img, nil
}

// chunk returns chunk i of img (at offset off), checked.
func (r *PackReader) chunk(img *PackedImage, i int, off int64) ([]byte, error) {
	c := img.Chunks[i]
	if c.Name == "" {
		return make([]byte, c.Len), nil
	}
	plain, err := r.readChunk(c)
	if err != nil {
		return nil, fmt.Errorf("image %s at offset %d: chunk %s: %w", img.Name, off, c.Name, err)
	}
	return plain, nil
}

func (r *PackReader) readChunk(c ChunkRef) ([]byte, error) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	f, err := r.packFile(c.Pack)
	if err != nil {
		return nil, err
	}
	buf := make([]byte, c.Stored)
	if n, err := f.ReadAt(buf, c.Off); n < len(buf) {
		if err == nil || err == io.EOF {
			err = fmt.Errorf("pack file %s ends before the chunk (truncated)", c.Pack)
		}
		return nil, fmt.Errorf("reading: %w", err)
	}
	var dk *dataKey
	if c.Key >= 0 && len(r.keys) > 0 {
		dk = r.keys[c.Key]
	}
	return openChunk(buf, dk, r.namer, c.Name, c.Len)
}

// packFile opens pack file id once (a regular file reached without a symlink); r.mu is held
// shared.
func (r *PackReader) packFile(id string) (*os.File, error) {
	if r.chunks == nil {
		return nil, errors.New("no chunk store (or the pack is closed)")
	}
	r.filesMu.Lock()
	defer r.filesMu.Unlock()
	if f, ok := r.files[id]; ok {
		return f, nil
	}
	f, _, err := openRegular(r.chunks, packFile(id))
	if err != nil {
		return nil, err
	}
	r.files[id] = f
	return f, nil
}

// Open implements ImageSource: the image read front to back, the next chunks fetched and checked
// ahead on other goroutines.
func (r *PackReader) Open(name string) (io.ReadCloser, error) {
	img, err := r.image(name)
	if err != nil {
		return nil, err
	}
	ahead := max(2, runtime.GOMAXPROCS(0))
	s := &seqReader{r: r, img: img, slots: make(chan chan chunkResult, ahead), stop: make(chan struct{})}
	go s.fetch()
	return s, nil
}

type chunkResult struct {
	b   []byte
	err error
}

// seqReader reads an image in order; fetch keeps up to cap(slots) chunks in flight.
type seqReader struct {
	r     *PackReader
	img   *PackedImage
	slots chan chan chunkResult
	stop  chan struct{}
	cur   []byte
	err   error
	once  sync.Once
}

func (s *seqReader) fetch() {
	defer close(s.slots)
	var off int64
	for i, c := range s.img.Chunks {
		res := make(chan chunkResult, 1)
		select {
		case s.slots <- res:
		case <-s.stop:
			return
		}
		go func(i int, off int64) {
			b, err := s.r.chunk(s.img, i, off)
			res <- chunkResult{b, err}
		}(i, off)
		off += int64(c.Len)
	}
}

func (s *seqReader) Read(p []byte) (int, error) {
	for len(s.cur) == 0 {
		if s.err != nil {
			return 0, s.err
		}
		res, ok := <-s.slots
		if !ok {
			s.err = io.EOF
			continue
		}
		got := <-res
		if got.err != nil {
			s.err = got.err
			continue
		}
		s.cur = got.b
	}
	n := copy(p, s.cur)
	s.cur = s.cur[n:]
	return n, nil
}

func (s *seqReader) Close() error {
	s.once.Do(func() { close(s.stop) })
	return nil
}

// OpenAt implements ImageReaderAt.
func (r *PackReader) OpenAt(name string) (ReaderAtCloser, int64, error) {
	img, err := r.image(name)
	if err != nil {
		return nil, 0, err
	}
	ra := &imageAt{r: r, img: img, offs: make([]int64, len(img.Chunks)+1), cache: map[int]*list.Element{}, lru: list.New()}
	for i, c := range img.Chunks {
		ra.offs[i+1] = ra.offs[i] + int64(c.Len)
	}
	return ra, img.Size, nil
}

// atCacheChunks: a lazy restore reads a page at a time, mostly near the previous one.
const atCacheChunks = 8

// imageAt is an image for random access, its last chunks cached (already checked).
type imageAt struct {
	r     *PackReader
	img   *PackedImage
	offs  []int64 // offs[i]: chunk i's offset; offs[len]: the size
	mu    sync.Mutex
	cache map[int]*list.Element
	lru   *list.List // of cachedChunk, most recent first
}

type cachedChunk struct {
	i int
	b []byte
}

func (a *imageAt) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("image %s: negative offset %d", a.img.Name, off)
	}
	if off >= a.img.Size {
		return 0, io.EOF
	}
	end := min(off+int64(len(p)), a.img.Size)
	i0 := a.chunkAt(off)
	bufs := make([][]byte, a.chunkAt(end-1)-i0+1)
	errs := make([]error, len(bufs))
	// A read spanning several chunks (a page server answering megabytes at once) fetches them
	// side by side.
	_ = inParallel(len(bufs), min(len(bufs), runtime.GOMAXPROCS(0)), func(k int) error {
		bufs[k], errs[k] = a.get(i0 + k)
		return nil
	})
	n := 0
	for k, b := range bufs {
		if errs[k] != nil {
			return n, errs[k]
		}
		at := off + int64(n)
		n += copy(p[n:end-off], b[at-a.offs[i0+k]:])
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// chunkAt is the index of the chunk holding offset at (< size).
func (a *imageAt) chunkAt(at int64) int {
	return sort.Search(len(a.img.Chunks), func(i int) bool { return a.offs[i+1] > at })
}

func (a *imageAt) get(i int) ([]byte, error) {
	a.mu.Lock()
	if e, ok := a.cache[i]; ok {
		a.lru.MoveToFront(e)
		a.mu.Unlock()
		return e.Value.(cachedChunk).b, nil
	}
	a.mu.Unlock()
	b, err := a.r.chunk(a.img, i, a.offs[i])
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, ok := a.cache[i]; !ok {
		a.cache[i] = a.lru.PushFront(cachedChunk{i, b})
		if a.lru.Len() > atCacheChunks {
			old := a.lru.Remove(a.lru.Back()).(cachedChunk)
			delete(a.cache, old.i)
		}
	}
	return b, nil
}

func (a *imageAt) Close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.cache, a.lru = map[int]*list.Element{}, list.New()
	return nil
}

// Verify reads and checks every chunk of every image (GOMAXPROCS at a time) without keeping
// them: for a caller that must know a checkpoint is whole before it starts restoring (the
// containers of a pod restore together or not at all). VerifyImagesAt checks image files only,
// so it passes a pack without reading it.
func (r *PackReader) Verify(ctx context.Context) error {
	type job struct {
		img *PackedImage
		i   int
		off int64
	}
	var jobs []job
	for k := range r.pack.Images {
		img := &r.pack.Images[k]
		var off int64
		for i, c := range img.Chunks {
			if c.Name != "" {
				jobs = append(jobs, job{img, i, off})
			}
			off += int64(c.Len)
		}
	}
	var failed atomic.Bool
	return inParallel(len(jobs), runtime.GOMAXPROCS(0), func(n int) error {
		if failed.Load() {
			return nil // the first error is enough
		}
		if err := ctx.Err(); err != nil {
			failed.Store(true)
			return err
		}
		_, err := r.chunk(jobs[n].img, jobs[n].i, jobs[n].off)
		if err != nil {
			failed.Store(true)
		}
		return err
	})
}
