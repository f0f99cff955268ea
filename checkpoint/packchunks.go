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

// compute decides what becomes of one chunk: nothing (zeros), a reference (a chunk this dump or
// the previous checkpoint stored already), or a new chunk file sealed here and written by an
// I/O worker.
func (s *packSink) compute(j *chunkJob) {
	if s.failed() != nil {
		s.done(j, ChunkRef{Len: len(j.data)})
		return
	}
	ref := ChunkRef{Len: len(j.data), Key: -1}
	if allZero(j.data) {
		s.done(j, ChunkRef{Len: len(j.data)})
		return
	}
	j.name = chunkName(s.ring.naming, j.data)
	ref.Name = j.name
	if r, ok := s.reuse(j.name, ref); ok {
		s.done(j, r)
		return
	}
	if s.dk != nil {
		ref.Key = 0
	}
	j.file = sealChunk(s.fileBufs.Get().([]byte), s.opt.Codec, s.dk, j.name, j.data)
	ref.Stored = int64(len(j.file))
	s.mu.Lock()
	s.seen[j.name] = &newChunk{ref: ref}
	s.mu.Unlock()
	s.bufs.Put(j.data[:0])
	j.data = nil
	s.io <- j
}

// reuse returns the reference to a chunk stored already: by this dump (claimed first, even if
// still being written: the dump fails as a whole if that write does), or by the previous
// checkpoint when its file is still there with the size it had.
func (s *packSink) reuse(name string, ref ChunkRef) (ChunkRef, bool) {
	s.mu.Lock()
	if c, ok := s.seen[name]; ok {
		s.mu.Unlock()
		return c.ref, true
	}
	s.mu.Unlock()
	p, ok := s.prev[name]
	if !ok {
		return ref, false
	}
	sub, err := s.subdir(name[:2])
	if err != nil {
		return ref, false
	}
	st, err := confine.Lstat(sub, name+"."+keyIDOf(p.key))
	if err != nil || !confine.IsReg(&st) || st.Size != p.stored {
		return ref, false
	}
	ref.Stored = p.stored
	s.mu.Lock()
	defer s.mu.Unlock()
	if p.key.ID != "" {
		i, ok := s.keyIdx[p.key.ID]
		if !ok {
			i = len(s.keys)
			s.keys = append(s.keys, p.key)
			s.keyIdx[p.key.ID] = i
		}
		ref.Key = i
	}
	s.seen[name] = &newChunk{ref: ref}
	return ref, true
}

func keyIDOf(wk WrappedKey) string {
	if wk.ID == "" {
		return plainID
	}
	return wk.ID
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

// write stores a sealed chunk: a temporary file in the chunk's directory, written and
// fdatasynced, renamed to its name without replacing anything.
func (s *packSink) write(j *chunkJob) {
	s.mu.Lock()
	ref := s.seen[j.name].ref
	s.mu.Unlock()
	if s.failed() == nil {
		if err := s.store(j); err != nil {
			s.fail(fmt.Errorf("image %s at offset %d: storing chunk %s: %w", j.img.Name, j.off, j.name, err))
		}
	}
	s.done(j, ref)
}

func (s *packSink) store(j *chunkJob) error {
	sub, err := s.subdir(j.name[:2])
	if err != nil {
		return err
	}
	final := j.name + "." + s.keyID()
	var rnd [6]byte
	_, _ = rand.Read(rnd[:])
	tmp := tmpPrefix + final + "-" + hex.EncodeToString(rnd[:])
	f, err := confine.CreateEntry(sub, tmp, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(j.file)
	if err == nil {
		err = unix.Fdatasync(int(f.Fd()))
	}
	err = errors.Join(err, f.Close())
	if err == nil {
		err = unix.Renameat2(int(sub.Fd()), tmp, int(sub.Fd()), final, unix.RENAME_NOREPLACE)
		if err == unix.EEXIST {
			err = fmt.Errorf("%s exists already (not written by this dump)", final)
		}
	}
	if err != nil {
		_ = unix.Unlinkat(int(sub.Fd()), tmp, 0)
		return err
	}
	s.mu.Lock()
	s.created = append(s.created, createdChunk{dir: sub, name: final})
	s.written += int64(len(j.file))
	s.mu.Unlock()
	return nil
}

func (s *packSink) keyID() string {
	if s.dk == nil {
		return plainID
	}
	return s.dk.id
}

// subdir opens (creating it) the chunk directory named by a name's first two hex digits,
// refusing a symlink or mount in its place; opened once per dump.
func (s *packSink) subdir(prefix string) (*os.File, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if d, ok := s.subdirs[prefix]; ok {
		return d, nil
	}
	d, err := confine.Mkdirat(s.chunks, prefix, 0o700)
	if err != nil {
		return nil, err
	}
	s.subdirs[prefix] = d
	return d, nil
}

// finish waits for every chunk, fsyncs the directories that got new chunks and returns the pack
// for the manifest.
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
	synced := map[*os.File]bool{}
	for _, c := range s.created {
		if !synced[c.dir] {
			synced[c.dir] = true
			if err := c.dir.Sync(); err != nil {
				return nil, fmt.Errorf("fsync of the chunk store: %w", err)
			}
		}
	}
	if err := s.chunks.Sync(); err != nil {
		return nil, fmt.Errorf("fsync of the chunk store: %w", err)
	}
	return s.pack(), nil
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

func (s *packSink) pack() *Pack {
	p := &Pack{ChunkSize: s.opt.ChunkSize, Keys: s.keys, Images: make([]PackedImage, len(s.images))}
	files := map[string]bool{}
	for i, img := range s.images {
		p.Images[i] = img.PackedImage
		for _, c := range img.Chunks {
			if c.Name != "" && !files[p.file(c)] {
				files[p.file(c)] = true
				p.Stored += c.Stored
			}
		}
	}
	p.Written = s.written
	return p
}

// abort drops the chunks this dump wrote (no manifest references them) and releases the store.
func (s *packSink) abort() {
	s.fail(errors.New("the checkpoint was aborted"))
	s.drain()
	for _, c := range s.created {
		_ = unix.Unlinkat(int(c.dir.Fd()), c.name, 0)
	}
	s.created = nil
	s.release()
}

// release closes the store's descriptors, which drops its lock.
func (s *packSink) release() {
	for k, d := range s.subdirs {
		d.Close()
		delete(s.subdirs, k)
	}
	if s.chunks != nil {
		s.chunks.Close()
		s.chunks = nil
	}
}
