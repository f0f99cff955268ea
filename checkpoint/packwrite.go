package checkpoint

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/klauspost/compress/s2"
	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/internal/confine"
)

// PackOptions tune the pack a Writer writes; the zero value is the agent's choice.
type PackOptions struct {
	// ChunkSize is a multiple of 4096 (0: DefaultChunkSize).
	ChunkSize int
	// Codec compresses chunks (0: DefaultCodec).
	Codec Codec
	// Plain stores chunks unencrypted (measurements, tools): still named by their keyed hash and
	// checked against it.
	Plain bool
	// Workers compress and encrypt (0: GOMAXPROCS).
	Workers int
	// hmacNaming names chunks by HMAC-SHA256, as packs written before BLAKE3 (tests of those).
	hmacNaming bool
}

// ioWorkers append records to pack files: page-cache copies, the disk works behind them
// (sync_file_range), so two keep up with the sealing workers.
const ioWorkers = 2

// Pack starts writing the dump's images as a pack into this checkpoint (see pack.go) and
// returns the sink CRIU's images go to. namespace is the pod's: its KEK wraps the checkpoint's
// data key, and the manifest given to Commit must name it. Chunks go to the container's chunk
// store (.chunks beside the checkpoints, created through the writer's descriptor); a chunk equal
// to one of the newest complete checkpoint is referenced instead of written. Commit finishes the
// pack and lists it in the manifest; Abort removes the chunks this dump wrote.
//
// Chunks are compressed and encrypted by Workers goroutines while the images arrive and written
// (temporary name, fdatasync, rename) by ioWorkers more, under the writer's context (Within).
func (w *Writer) Pack(ring *KeyRing, namespace string, opt PackOptions) (ImageSink, error) {
	if ring == nil {
		return nil, errNoKeyRing
	}
	if w.pack != nil {
		return nil, errors.New("the checkpoint has a pack already")
	}
	opt = opt.withDefaults()
	if opt.ChunkSize%4096 != 0 || opt.ChunkSize > maxChunkSize {
		return nil, fmt.Errorf("chunk size %d: not a multiple of 4096 up to %d", opt.ChunkSize, maxChunkSize)
	}
	s := &packSink{w: w, ring: ring, namer: ring.namer(opt.naming()), ns: namespace, opt: opt, ctx: w.context(),
		keyIdx: map[string]int{}, names: map[string]bool{}, seen: map[string]ChunkRef{},
		loc: map[string]chunkLoc{}, packSizes: map[string]int64{}}
	if err := s.open(); err != nil {
		s.release()
		return nil, err
	}
	s.start()
	w.pack = s
	return s, nil
}

func (o PackOptions) naming() string {
	if o.hmacNaming {
		return namingHMAC
	}
	return NamingBLAKE3
}

func (o PackOptions) withDefaults() PackOptions {
	if o.ChunkSize == 0 {
		o.ChunkSize = DefaultChunkSize
	}
	if o.Codec == 0 {
		o.Codec = DefaultCodec
	}
	if o.Workers <= 0 {
		o.Workers = runtime.GOMAXPROCS(0)
	}
	return o
}

// packSink is the ImageSink of a Writer's pack.
type packSink struct {
	w     *Writer
	ring  *KeyRing
	namer chunkNamer // names this dump's chunks
	ns    string
	opt   PackOptions
	ctx   context.Context
	// chunks is the chunk store, shared-locked (flock) until the checkpoint is committed or
	// aborted: the sweep of PruneAt takes the lock exclusively, so it never removes a chunk a
	// dump in progress wrote or reuses.
	chunks *os.File

	dk     *dataKey // nil: Plain
	keys   []WrappedKey
	keyIdx map[string]int // data key id → index in keys
	// prev: the newest complete checkpoint's chunks, by name; prevLive: the bytes it references
	// per pack file; packSizes: sizes of pack files seen (0: missing).
	prev      map[string]prevChunk
	prevLive  map[string]int64
	packSizes map[string]int64

	work, io       chan *chunkJob
	workWG, ioWG   sync.WaitGroup
	senders        sync.WaitGroup
	in             atomic.Int64 // image bytes received
	bufs, fileBufs sync.Pool

	mu     sync.Mutex
	images []*packImage
	names  map[string]bool
	seen   map[string]ChunkRef // chunks of this dump by name (name, key; located in loc)
	loc    map[string]chunkLoc // where each chunk of this dump is stored
	outs   []*packOut          // the pack files this dump writes
	// written is the bytes appended to this dump's pack files.
	written         int64
	err             error
	closed, settled bool
}

// prevChunk is a chunk of the newest complete checkpoint.
type prevChunk struct {
	key WrappedKey // zero: plain
	loc chunkLoc
}

type packImage struct {
	PackedImage
	closed  bool
	pending sync.WaitGroup
}

type chunkJob struct {
	img  *packImage
	i    int
	off  int64
	data []byte
	file []byte
	name string
	ref  ChunkRef
}

// open creates or opens the chunk store, takes its shared lock, draws the data key and indexes
// the newest checkpoint's chunks.
func (s *packSink) open() error {
	var err error
	if s.chunks, err = confine.Mkdirat(s.w.dir, chunksDir, 0o700); err != nil {
		return fmt.Errorf("chunk store: %w", err)
	}
	if err := unix.Flock(int(s.chunks.Fd()), unix.LOCK_SH); err != nil {
		return fmt.Errorf("locking the chunk store: %w", err)
	}
	if !s.opt.Plain {
		dk, wk, err := s.ring.newDataKey(s.ns)
		if err != nil {
			return fmt.Errorf("data key: %w", err)
		}
		s.dk, s.keys, s.keyIdx[wk.ID] = dk, []WrappedKey{wk}, 0
	}
	s.prev, s.prevLive = s.loadPrev()
	cs := s.opt.ChunkSize
	s.bufs.New = func() any { return make([]byte, 0, cs) }
	// Room for s2's worst case (compress falls back to raw when it saves too little, but only
	// after encoding), plus the record's header, nonce and tag.
	s.fileBufs.New = func() any { return make([]byte, 0, s2.MaxEncodedLen(cs)+chunkHdrLen+gcmNonceSize+gcmOverhead) }
	return nil
}

// loadPrev indexes the chunks of the newest complete checkpoint, if its manifest is authentic
// and its chunks can be shared: same namespace, chunk size, naming and encryption. Anything else gives
// an empty index (the dump then writes every chunk).
func (s *packSink) loadPrev() (map[string]prevChunk, map[string]int64) {
	out, live := map[string]prevChunk{}, map[string]int64{}
	ids, err := listAt(s.w.dir)
	if err != nil || len(ids) == 0 {
		return out, live
	}
	m, err := readAuthentic(s.w.dir, ids[0], s.ring.manifest)
	if err != nil || m.Pack == nil || m.Pod.Namespace != s.ns || m.Pack.ChunkSize != s.opt.ChunkSize || m.Pack.Naming != s.namer.naming ||
		(len(m.Pack.Keys) == 0) != s.opt.Plain || m.Pack.validate() != nil {
		return out, live
	}
	for _, img := range m.Pack.Images {
		for _, c := range img.Chunks {
			if _, dup := out[c.Name]; c.Name == "" || dup {
				continue
			}
			pc := prevChunk{loc: chunkLoc{pack: c.Pack, off: c.Off, stored: c.Stored}}
			if c.Key >= 0 {
				pc.key = m.Pack.Keys[c.Key]
				// Only chunks under the namespace's current KEK are shared: after a rotation the
				// first dump writes every chunk anew, so the old KEK is needed by older
				// checkpoints only and can be removed once they are pruned.
				if len(s.keys) > 0 && pc.key.KEK != s.keys[0].KEK {
					continue
				}
			}
			out[c.Name] = pc
			live[c.Pack] += c.Stored
		}
	}
	return out, live
}

// readAuthentic reads the manifest of checkpoint id in dir if its marker authenticates it.
func readAuthentic(dir *os.File, id string, key Key) (*Manifest, error) {
	d, err := confine.OpenEntry(dir, id, unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	marker, err := readSmall(d, MarkerName)
	if err != nil {
		return nil, err
	}
	data, err := readSmall(d, ManifestName)
	if err != nil {
		return nil, err
	}
	if err := key.check(string(marker), data); err != nil {
		return nil, err
	}
	return parseManifest(data)
}

func (s *packSink) start() {
	s.work = make(chan *chunkJob, s.opt.Workers)
	s.io = make(chan *chunkJob, ioWorkers)
	for range s.opt.Workers {
		s.workWG.Add(1)
		go func() {
			defer s.workWG.Done()
			for j := range s.work {
				s.compute(j)
			}
		}()
	}
	for range ioWorkers {
		s.ioWG.Add(1)
		go func() {
			defer s.ioWG.Done()
			s.ioWorker()
		}()
	}
}

// Create implements ImageSink.
func (s *packSink) Create(name string) (io.WriteCloser, error) {
	if err := checkImageName(name); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, errors.New("the pack is finished")
	}
	if s.names[name] {
		return nil, fmt.Errorf("image %s: written twice", name)
	}
	s.names[name] = true
	img := &packImage{PackedImage: PackedImage{Name: name, Chunks: []ChunkRef{}}}
	s.images = append(s.images, img)
	return &imageWriter{s: s, img: img, buf: s.bufs.Get().([]byte)[:0]}, nil
}

// fail records the pack's first error: the images still arriving are discarded, every later
// Write and Close returns it.
func (s *packSink) fail(err error) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.mu.Unlock()
}

func (s *packSink) failed() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err == nil {
		if err := s.ctx.Err(); err != nil {
			s.err = fmt.Errorf("writing the checkpoint stopped: %w", err)
		}
	}
	return s.err
}

// imageWriter cuts one image into chunks.
type imageWriter struct {
	s   *packSink
	img *packImage
	buf []byte
	off int64 // of buf's first byte in the image
}

func (iw *imageWriter) Write(p []byte) (int, error) {
	if err := iw.s.failed(); err != nil {
		return 0, err
	}
	n := len(p)
	for len(p) > 0 {
		k := copy(iw.buf[len(iw.buf):cap(iw.buf)], p)
		iw.buf, p = iw.buf[:len(iw.buf)+k], p[k:]
		if len(iw.buf) == cap(iw.buf) {
			if err := iw.flush(); err != nil {
				return n - len(p), err
			}
		}
	}
	iw.s.in.Add(int64(n))
	return n, nil
}

// ReadFrom fills chunks straight from r until EOF (the image pipe: one copy fewer than Write).
func (iw *imageWriter) ReadFrom(r io.Reader) (int64, error) {
	var n int64
	for {
		if err := iw.s.failed(); err != nil {
			return n, err
		}
		k, err := io.ReadFull(r, iw.buf[len(iw.buf):cap(iw.buf)])
		iw.buf = iw.buf[:len(iw.buf)+k]
		n += int64(k)
		iw.s.in.Add(int64(k))
		if len(iw.buf) == cap(iw.buf) {
			if ferr := iw.flush(); ferr != nil {
				return n, ferr
			}
		}
		switch {
		case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
			return n, nil
		case err != nil:
			return n, err
		}
	}
}

// flush hands the buffered chunk to the workers.
func (iw *imageWriter) flush() error {
	s := iw.s
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return errors.New("the pack is finished")
	}
	j := &chunkJob{img: iw.img, i: len(iw.img.Chunks), off: iw.off, data: iw.buf}
	iw.img.Chunks = append(iw.img.Chunks, ChunkRef{Len: len(iw.buf)})
	iw.img.Size += int64(len(iw.buf))
	s.senders.Add(1)
	s.mu.Unlock()
	defer s.senders.Done()
	iw.img.pending.Add(1)
	iw.off += int64(len(iw.buf))
	iw.buf = s.bufs.Get().([]byte)[:0]
	select {
	case s.work <- j:
		return nil
	case <-s.ctx.Done():
		iw.img.pending.Done()
		return s.failed()
	}
}

// Close ends the image once its chunks are stored.
func (iw *imageWriter) Close() error {
	if iw.img.closed {
		return nil
	}
	var err error
	if len(iw.buf) > 0 {
		err = iw.flush()
	}
	iw.img.pending.Wait()
	iw.s.mu.Lock()
	iw.img.closed = true
	iw.s.mu.Unlock()
	return errors.Join(err, iw.s.failed())
}

// finishPack completes the pack, if any, into m.
func (w *Writer) finishPack(m *Manifest) error {
	if w.pack == nil {
		return nil
	}
	if m.Pod.Namespace != w.pack.ns {
		return fmt.Errorf("the manifest's namespace %q is not the pack's %q (its data key is wrapped for the latter)", m.Pod.Namespace, w.pack.ns)
	}
	p, err := w.pack.finish()
	if err != nil {
		return err
	}
	m.Pack = p
	return nil
}

// parseManifest decodes a manifest (not checked).
func parseManifest(data []byte) (*Manifest, error) {
	var m Manifest
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("manifest.json: %w", err)
	}
	return &m, nil
}
