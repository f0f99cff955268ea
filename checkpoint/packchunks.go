package checkpoint

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/internal/confine"
)

// packMax: an I/O worker starts a new pack file past this size. Pack files are removed whole, so
// smaller ones free space sooner; larger ones cost fewer files.
const packMax = 64 << 20

// minLive: a chunk of the previous checkpoint is reused only from a pack file of which that
// checkpoint still references this share; the others are written anew so that a pack file mostly
// dead is released once the checkpoints referencing it are pruned (bounds the space a long chain
// of checkpoints keeps to about twice what it references).
const minLive = 0.5

// chunkLoc is where a chunk's record is.
type chunkLoc struct {
	pack   string
	off    int64
	stored int64
}

// packOut is a pack file an I/O worker appends to.
type packOut struct {
	id      string
	f       *os.File
	size    int64
	flushed int64 // writeback started up to here
	final   bool  // renamed to its final name
}

// writebackEvery: the writeback of a pack file is started (sync_file_range) each time this much
// was appended, so the final fdatasync finds little left to write; 8 MiB as the image follower
// measured (docs/agent.md, "Dump").
const writebackEvery = 8 << 20

// compute decides what becomes of one chunk: nothing (zeros), a reference (a chunk this dump or
// the previous checkpoint stored already), or a new record sealed here and appended by an I/O
// worker.
func (s *packSink) compute(j *chunkJob) {
	if s.failed() != nil || allZero(j.data) {
		s.done(j, ChunkRef{Len: len(j.data)})
		return
	}
	j.name = s.namer.name(j.data)
	ref, reused := s.reuse(j.name, len(j.data))
	if reused {
		s.done(j, ref)
		return
	}
	j.file = sealChunk(s.fileBufs.Get().([]byte), s.opt.Codec, s.dk, j.name, j.data)
	s.bufs.Put(j.data[:0])
	j.data = nil
	j.ref = ref
	s.io <- j
}

// reuse returns the chunk's reference and whether it is stored already: by this dump (claimed by
// its first occurrence, even if still being written: the dump fails as a whole if that write
// does), or by the previous checkpoint, in a pack file still there and live enough. Otherwise
// the chunk is claimed for this dump, under this dump's data key.
func (s *packSink) reuse(name string, n int) (ChunkRef, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r, ok := s.seen[name]; ok {
		r.Len = n
		return r, true
	}
	ref := ChunkRef{Name: name, Len: n, Key: -1}
	if p, ok := s.prev[name]; ok && s.packUsable(p.loc) {
		if p.key.ID != "" {
			i, ok := s.keyIdx[p.key.ID]
			if !ok {
				i = len(s.keys)
				s.keys = append(s.keys, p.key)
				s.keyIdx[p.key.ID] = i
			}
			ref.Key = i
		}
		s.seen[name], s.loc[name] = ref, p.loc
		return ref, true
	}
	if s.dk != nil {
		ref.Key = 0
	}
	s.seen[name] = ref
	return ref, false
}

// packUsable reports whether the previous checkpoint's pack file holding loc is there, holds
// loc, and is live enough to reuse (minLive). Called with s.mu held; one stat per pack file.
func (s *packSink) packUsable(loc chunkLoc) bool {
	size, ok := s.packSizes[loc.pack]
	if !ok {
		st, err := confine.Lstat(s.chunks, packFile(loc.pack))
		if err == nil && confine.IsReg(&st) {
			size = st.Size
		}
		s.packSizes[loc.pack] = size
	}
	return size > 0 && loc.off+loc.stored <= size && float64(s.prevLive[loc.pack]) >= minLive*float64(size)
}

// done records chunk j's reference in its image.
func (s *packSink) done(j *chunkJob, ref ChunkRef) {
	s.mu.Lock()
	j.img.Chunks[j.i] = ref
	s.mu.Unlock()
	if j.data != nil {
		s.bufs.Put(j.data[:0])
	}
	if j.file != nil {
		s.fileBufs.Put(j.file[:0])
	}
	j.img.pending.Done()
}

// ioWorker appends sealed chunks to pack files of its own.
func (s *packSink) ioWorker() {
	var out *packOut
	for j := range s.io {
		if s.failed() == nil {
			var err error
			if out, err = s.append(out, j.file); err != nil {
				s.fail(fmt.Errorf("image %s at offset %d: storing chunk %s: %w", j.img.Name, j.off, j.name, err))
			} else {
				s.mu.Lock()
				s.loc[j.name] = chunkLoc{pack: out.id, off: out.size - int64(len(j.file)), stored: int64(len(j.file))}
				s.written += int64(len(j.file))
				s.mu.Unlock()
			}
		}
		s.done(j, j.ref)
	}
}

// append writes a record at the end of out (a new pack file when out is nil or full) and starts
// its writeback; finish waits for it.
func (s *packSink) append(out *packOut, rec []byte) (*packOut, error) {
	if out == nil || out.size >= packMax {
		var err error
		if out, err = s.newPackFile(); err != nil {
			return nil, err
		}
	}
	n, err := out.f.Write(rec)
	out.size += int64(n)
	if err != nil {
		return out, err
	}
	if out.size-out.flushed >= writebackEvery {
		err := unix.SyncFileRange(int(out.f.Fd()), out.flushed, out.size-out.flushed, unix.SYNC_FILE_RANGE_WRITE)
		if err != nil {
			return out, fmt.Errorf("starting the writeback of %s: %w", out.f.Name(), err)
		}
		out.flushed = out.size
	}
	return out, nil
}

func (s *packSink) newPackFile() (*packOut, error) {
	var b [8]byte
	_, _ = rand.Read(b[:])
	out := &packOut{id: hex.EncodeToString(b[:])}
	f, err := confine.CreateEntry(s.chunks, tmpPrefix+out.id, 0o600)
	if err != nil {
		return nil, err
	}
	out.f = f
	s.mu.Lock()
	s.outs = append(s.outs, out)
	s.mu.Unlock()
	return out, nil
}

// finish waits for every chunk, makes the pack files durable under their final names and
// returns the pack for the manifest.
func (s *packSink) finish() (*Pack, error) {
	s.drain()
	if err := s.failed(); err != nil {
		return nil, err
	}
	for _, img := range s.images {
		if !img.closed {
			return nil, fmt.Errorf("image %s: not closed (incomplete)", img.Name)
		}
	}
	if err := s.sync(); err != nil {
		return nil, err
	}
	return s.pack()
}

// sync fdatasyncs the pack files (their writeback is under way since each record was written),
// renames them into place without replacing anything, and fsyncs the chunk store.
func (s *packSink) sync() error {
	for _, o := range s.outs {
		if err := unix.Fdatasync(int(o.f.Fd())); err != nil {
			return fmt.Errorf("fdatasync %s: %w", o.f.Name(), err)
		}
	}
	for _, o := range s.outs {
		err := unix.Renameat2(int(s.chunks.Fd()), tmpPrefix+o.id, int(s.chunks.Fd()), packFile(o.id), unix.RENAME_NOREPLACE)
		if err != nil {
			return fmt.Errorf("renaming pack file %s into place: %w", o.id, err)
		}
		o.final = true
	}
	if err := s.chunks.Sync(); err != nil {
		return fmt.Errorf("fsync of the chunk store: %w", err)
	}
	return nil
}

// drain stops accepting images and waits for the workers.
func (s *packSink) drain() {
	s.mu.Lock()
	if s.settled {
		s.mu.Unlock()
		return
	}
	s.closed, s.settled = true, true
	s.mu.Unlock()
	s.senders.Wait()
	close(s.work)
	s.workWG.Wait()
	close(s.io)
	s.ioWG.Wait()
}

// pack builds the manifest's pack: every chunk located.
func (s *packSink) pack() (*Pack, error) {
	p := &Pack{ChunkSize: s.opt.ChunkSize, Naming: s.namer.naming, Keys: s.keys, Images: make([]PackedImage, len(s.images)), Written: s.written}
	counted := map[string]bool{}
	for i, img := range s.images {
		for k, c := range img.Chunks {
			if c.Name == "" {
				continue
			}
			loc, ok := s.loc[c.Name]
			if !ok {
				return nil, fmt.Errorf("image %s chunk %d: not stored", img.Name, k)
			}
			img.Chunks[k].Pack, img.Chunks[k].Off, img.Chunks[k].Stored = loc.pack, loc.off, loc.stored
			if !counted[c.Name] {
				counted[c.Name] = true
				p.Stored += loc.stored
			}
		}
		p.Images[i] = img.PackedImage
	}
	return p, nil
}

// abort drops the pack files this dump wrote (no manifest references them) and releases the
// store.
func (s *packSink) abort() {
	s.fail(errors.New("the checkpoint was aborted"))
	s.drain()
	if s.chunks == nil { // released already (committed)
		return
	}
	for _, o := range s.outs {
		o.f.Close()
		name := tmpPrefix + o.id
		if o.final {
			name = packFile(o.id)
		}
		_ = unix.Unlinkat(int(s.chunks.Fd()), name, 0)
	}
	s.outs = nil
	s.release()
}

// release closes the store's descriptors, which drops its lock.
func (s *packSink) release() {
	for _, o := range s.outs {
		o.f.Close()
	}
	if s.chunks != nil {
		s.chunks.Close()
		s.chunks = nil
	}
}

// packIDs lists the pack files this dump wrote.
func (s *packSink) packIDs() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, o := range s.outs {
		out = append(out, o.id)
	}
	return out
}
