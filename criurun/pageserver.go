package criurun

// The pages of a lazy restore (issue 16): the tasks' pagemaps, and their lazy runs read from an
// ImageReaderAt, which verifies every chunk against the signed manifest before returning it. A
// page that does not verify is never given to the lazy-pages daemon (uffd.go): the task that
// faulted on it stays blocked in the kernel until the caller kills the restored tree.

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sort"
	"sync"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/stasis-k8s/stasis/checkpoint"
)

// CRIU's constants (criu/include/magic.h, pagemap.h, page-xfer.c).
const (
	imgCommonMagic = 0x54564319
	pagemapMagic   = 0x56084025

	PageSize = 4096

	peParent  = 1 << 0
	peLazy    = 1 << 1
	pePresent = 1 << 2
)

// PagemapEntry is one run of pages of a task, and where its data sits in the pages image.
type PagemapEntry struct {
	Vaddr, NrPages uint64
	Flags          uint32
	Offset         int64 // in the pages image (entries with PE_PRESENT)
}

// Lazy says CRIU may leave the run to the lazy-pages daemon (anonymous private memory: see
// vma_entry_can_be_lazy), which `criu restore --lazy-pages` then skips.
func (e PagemapEntry) Lazy() bool { return e.Flags&peLazy != 0 }

// Present says the run's data is in the pages image.
func (e PagemapEntry) Present() bool { return e.Flags&pePresent != 0 }

func (e PagemapEntry) end() uint64 { return e.Vaddr + e.NrPages*PageSize }

// Pagemap is one pagemap image: the pages image it refers to and its runs, by address.
type Pagemap struct {
	PagesID uint32
	Entries []PagemapEntry
}

// PagesImage names the pages image of the pagemap.
func (p *Pagemap) PagesImage() string { return fmt.Sprintf("pages-%d.img", p.PagesID) }

// ParsePagemap reads a pagemap image (pagemap-<pid>.img): magics, the head, the entries. Runs in
// a parent checkpoint (pre-dump chains) are refused: Stasis never writes them.
func ParsePagemap(r io.Reader) (*Pagemap, error) {
	br := bufio.NewReader(r)
	var magic uint32
	if err := binary.Read(br, binary.LittleEndian, &magic); err != nil {
		return nil, fmt.Errorf("pagemap magic: %w", err)
	}
	if magic == imgCommonMagic {
		if err := binary.Read(br, binary.LittleEndian, &magic); err != nil {
			return nil, fmt.Errorf("pagemap magic: %w", err)
		}
	}
	if magic != pagemapMagic {
		return nil, fmt.Errorf("not a pagemap image (magic %#x)", magic)
	}
	b, ok, err := readRecord(br)
	if err != nil || !ok {
		return nil, fmt.Errorf("pagemap head: missing (%v)", err)
	}
	head, err := decodeFields(b)
	if err != nil {
		return nil, fmt.Errorf("pagemap head: %w", err)
	}
	pm := &Pagemap{PagesID: uint32(head[1])}
	var off int64
	for {
		b, ok, err := readRecord(br)
		if err != nil {
			return nil, fmt.Errorf("pagemap entry %d: %w", len(pm.Entries), err)
		}
		if !ok {
			break
		}
		f, err := decodeFields(b)
		if err != nil {
			return nil, fmt.Errorf("pagemap entry %d: %w", len(pm.Entries), err)
		}
		e := pagemapEntry(f)
		if e.Flags&peParent != 0 {
			return nil, fmt.Errorf("pagemap entry at %#x: pages in a parent checkpoint", e.Vaddr)
		}
		if n := len(pm.Entries); n > 0 && e.Vaddr < pm.Entries[n-1].end() {
			return nil, fmt.Errorf("pagemap entry at %#x overlaps or precedes the previous one", e.Vaddr)
		}
		if e.Present() {
			e.Offset = off
			off += int64(e.NrPages) * PageSize
		}
		pm.Entries = append(pm.Entries, e)
	}
	return pm, nil
}

// readRecord reads one CRIU image record (u32 length, then a protobuf message); false at a
// clean end.
func readRecord(r io.Reader) ([]byte, bool, error) {
	var n uint32
	if err := binary.Read(r, binary.LittleEndian, &n); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, false, nil
		}
		return nil, false, err
	}
	if n > 1<<20 {
		return nil, false, fmt.Errorf("record of %d bytes", n)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, false, err
	}
	return b, true, nil
}

// decodeFields returns the varint fields of a message by number. Pagemap messages are decoded by
// hand: go-criu's pagemap_entry predates field 5 (nr_pages, u64), the only count CRIU 4 fills
// (compat_nr_pages, field 2, stays 0).
func decodeFields(b []byte) (map[protowire.Number]uint64, error) {
	out := map[protowire.Number]uint64{}
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, protowire.ParseError(n)
		}
		b = b[n:]
		if typ != protowire.VarintType {
			n = protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return nil, protowire.ParseError(n)
			}
			b = b[n:]
			continue
		}
		v, n := protowire.ConsumeVarint(b)
		if n < 0 {
			return nil, protowire.ParseError(n)
		}
		out[num] = v
		b = b[n:]
	}
	return out, nil
}

// pagemapEntry reads pagemap_entry {1 vaddr, 2 compat_nr_pages, 3 in_parent, 4 flags, 5 nr_pages}
// as criu/pagemap.c init_pagemaps does, old images included.
func pagemapEntry(f map[protowire.Number]uint64) PagemapEntry {
	e := PagemapEntry{Vaddr: f[1], NrPages: f[2], Flags: uint32(f[4])}
	if n, ok := f[5]; ok {
		e.NrPages = n
	}
	if _, ok := f[4]; !ok {
		e.Flags = pePresent
		if f[3] != 0 {
			e.Flags = peParent
		}
	}
	return e
}

// find returns the run holding vaddr.
func (p *Pagemap) find(vaddr uint64) (PagemapEntry, bool) {
	i := sort.Search(len(p.Entries), func(i int) bool { return p.Entries[i].end() > vaddr })
	if i == len(p.Entries) || p.Entries[i].Vaddr > vaddr {
		return PagemapEntry{}, false
	}
	return p.Entries[i], true
}

// PageServer reads the lazy pages of a restore's tasks, for the lazy-pages daemon.
type PageServer struct {
	tasks  map[uint64]*Pagemap // by PID in the images (dst_id)
	images checkpoint.ImageReaderAt

	mu     sync.Mutex
	pages  map[uint32]checkpoint.ReaderAtCloser
	aheads map[uint32]*readAhead
}

// NewPageServer serves the tasks' pagemaps (by PID in the images) from images.
func NewPageServer(tasks map[uint64]*Pagemap, images checkpoint.ImageReaderAt) *PageServer {
	return &PageServer{tasks: tasks, images: images, pages: map[uint32]checkpoint.ReaderAtCloser{}, aheads: map[uint32]*readAhead{}}
}

// ErrPagesUnverified marks a fault answered by nothing because its pages did not verify (or could
// not be read): the restored tree must not run on.
var ErrPagesUnverified = errors.New("lazy pages could not be served")

// read returns the verified pages [vaddr, vaddr+nr pages) of task id, or fewer when the run that
// holds vaddr ends earlier.
func (s *PageServer) read(id, vaddr, nr uint64, buf []byte) ([]byte, uint64, error) {
	pm, ok := s.tasks[id]
	if !ok {
		return nil, 0, fmt.Errorf("no pagemap for task %d", id)
	}
	e, ok := pm.find(vaddr)
	if !ok || !e.Lazy() || !e.Present() || vaddr%PageSize != 0 || nr == 0 {
		return nil, 0, fmt.Errorf("no lazy pages at %#x in pagemap of task %d", vaddr, id)
	}
	n := min(nr, (e.end()-vaddr)/PageSize)
	if need := int(n * PageSize); cap(buf) < need {
		buf = make([]byte, need)
	}
	data := buf[:n*PageSize]
	ra, err := s.pagesImage(pm)
	if err != nil {
		return nil, 0, err
	}
	if _, err := ra.ReadAt(data, e.Offset+int64(vaddr-e.Vaddr)); err != nil {
		return nil, 0, fmt.Errorf("%s: %w", pm.PagesImage(), err)
	}
	return data, n, nil
}

func (s *PageServer) pagesImage(pm *Pagemap) (io.ReaderAt, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ra, ok := s.aheads[pm.PagesID]; ok {
		return ra, nil
	}
	ra, size, err := s.images.OpenAt(pm.PagesImage())
	if err != nil {
		return nil, err
	}
	s.pages[pm.PagesID] = ra
	s.aheads[pm.PagesID] = newReadAhead(ra, size)
	return s.aheads[pm.PagesID], nil
}

// Close releases the pages images.
func (s *PageServer) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for id, ra := range s.pages {
		ra.Close()
		delete(s.pages, id)
	}
}

// readAhead serves a pages image to the page server, reading ahead of sequential readers. The
// daemon pulls the background pages in image order, one request (up to 4 MiB) at a time, and waits
// for each: without read-ahead, reading and checking the next chunks would not overlap with the
// daemon copying the previous ones into the app. Blocks are read through the verified ReaderAt, on
// up to 2 x GOMAXPROCS goroutines; a block that fails is an error only if it is asked for.
type readAhead struct {
	ra   io.ReaderAt
	size int64
	sem  chan struct{}

	mu      sync.Mutex
	blocks  map[int64]*raBlock
	streams [4]int64 // where the last readers stopped: a read starting there is sequential
	nextSt  int
}

type raBlock struct {
	done chan struct{}
	data []byte
	err  error
}

const (
	raBlockSize = 1 << 20
	raWindow    = 16 // blocks read ahead of a sequential reader
)

func newReadAhead(ra io.ReaderAt, size int64) *readAhead {
	// Reads wait on the disk as much as on the CPU (a pack's chunks are small files, decrypted and
	// decompressed): twice as many readers as CPUs.
	return &readAhead{ra: ra, size: size, sem: make(chan struct{}, max(4, 2*runtime.GOMAXPROCS(0))), blocks: map[int64]*raBlock{}}
}

// block returns block i, starting its read if needed; called with mu held.
func (r *readAhead) block(i int64) *raBlock {
	if b, ok := r.blocks[i]; ok {
		return b
	}
	b := &raBlock{done: make(chan struct{})}
	r.blocks[i] = b
	go func() {
		r.sem <- struct{}{}
		defer func() { <-r.sem }()
		n := min(raBlockSize, r.size-i*raBlockSize)
		b.data = make([]byte, n)
		_, b.err = r.ra.ReadAt(b.data, i*raBlockSize)
		close(b.done)
	}()
	return b
}

func (r *readAhead) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > r.size {
		return 0, fmt.Errorf("read of %d bytes at %d beyond the image's %d", len(p), off, r.size)
	}
	first, last := off/raBlockSize, (off+int64(len(p))-1)/raBlockSize
	r.mu.Lock()
	var need []*raBlock
	for i := first; i <= last; i++ {
		need = append(need, r.block(i))
	}
	r.plan(off, off+int64(len(p)), last)
	r.mu.Unlock()
	n := 0
	for k, b := range need {
		<-b.done
		if b.err != nil {
			return n, b.err
		}
		start := int64(0)
		if k == 0 {
			start = off - first*raBlockSize
		}
		n += copy(p[n:], b.data[start:])
	}
	return n, nil
}

// plan reads ahead of a sequential reader and forgets blocks no reader is near; called with mu
// held.
func (r *readAhead) plan(off, end, last int64) {
	// A reader that continues where it stopped, or a little further (the daemon skips the runs
	// CRIU restored itself), is sequential.
	seq := false
	for k, s := range r.streams {
		if !seq && off >= s && off-s <= raBlockSize {
			seq = true
			r.streams[k] = end
		}
	}
	if !seq {
		r.streams[r.nextSt] = end
		r.nextSt = (r.nextSt + 1) % len(r.streams)
	}
	if seq {
		for i := last + 1; i <= last+raWindow && i*raBlockSize < r.size; i++ {
			r.block(i)
		}
	}
	for i := range r.blocks {
		near := false
		for _, s := range r.streams {
			if si := s / raBlockSize; i >= si-1 && i <= si+raWindow {
				near = true
			}
		}
		if !near {
			delete(r.blocks, i)
		}
	}
}
