package checkpoint

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"os"

	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/internal/confine"
)

// ImageSink is where a streamed dump's images go (CRIU → the agent's streamer → here): plain
// image files in the checkpoint's images directory, each hashed and its writeback started as it
// arrives, in one pass over the bytes. Commit then finds every image hashed and almost all of it
// on disk (it fsyncs the tail). The files are those of a file-based dump, so a checkpoint stays
// readable by CRIU's own tools. Images are created one at a time (the streamer serializes them),
// each name once.
func (w *Writer) ImageSink() ImageSink {
	w.sinkMu.Lock()
	defer w.sinkMu.Unlock()
	if w.sums == nil {
		w.sums = map[string]FileSum{}
	}
	return fileSink{w}
}

type fileSink struct{ w *Writer }

func (s fileSink) Create(name string) (io.WriteCloser, error) {
	if !safeRel(name) || name != pathBase(name) || name == DumpLogName {
		return nil, fmt.Errorf("image name %q: not a plain image file name", name)
	}
	f, err := confine.CreateEntry(s.w.images, name, 0o600)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", name, err)
	}
	return &sinkFile{w: s.w, name: name, f: f, h: sha256.New(), synced: make(chan error, 1)}, nil
}

func pathBase(name string) string {
	for i := len(name) - 1; i >= 0; i-- {
		if name[i] == '/' {
			return name[i+1:]
		}
	}
	return name
}

// sinkFile is one image being written: the hash runs beside the write (CRIU's dump keeps one core
// busy; the hash and the copy into the page cache share the other), and every syncChunk an
// fdatasync starts in the background (see follower.writeback: it spreads the disk's cache flushes
// over the dump).
type sinkFile struct {
	w       *Writer
	name    string
	f       *os.File
	h       hash.Hash
	n       int64
	unsync  int64
	syncing bool
	synced  chan error // the background fdatasync's result
	err     error
}

func (s *sinkFile) Write(p []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	if err := s.w.context().Err(); err != nil {
		s.err = fmt.Errorf("image %s: stopped: %w", s.name, err)
		return 0, s.err
	}
	if len(p) < 256<<10 {
		s.h.Write(p)
	} else {
		done := make(chan struct{})
		go func() { s.h.Write(p); close(done) }()
		defer func() { <-done }()
	}
	n, err := s.f.Write(p)
	s.n += int64(n)
	if err != nil {
		s.err = fmt.Errorf("image %s: %w", s.name, err)
		return n, s.err
	}
	if s.unsync += int64(n); s.unsync >= syncChunk {
		s.startSync()
	}
	return n, nil
}

// startSync starts an fdatasync unless one is running still (its error counts at Close).
func (s *sinkFile) startSync() {
	if s.syncing {
		select {
		case err := <-s.synced:
			s.syncing = false
			if err != nil {
				s.err = fmt.Errorf("fdatasync %s: %w", s.name, err)
				return
			}
		default:
			return
		}
	}
	s.syncing, s.unsync = true, 0
	fd := int(s.f.Fd())
	go func() { s.synced <- unix.Fdatasync(fd) }()
}

// Close records the image's size and sha256 for Commit (which fsyncs it).
func (s *sinkFile) Close() error {
	if s.syncing {
		if err := <-s.synced; err != nil && s.err == nil {
			s.err = fmt.Errorf("fdatasync %s: %w", s.name, err)
		}
	}
	cerr := s.f.Close()
	if s.err != nil {
		return s.err
	}
	if cerr != nil {
		return fmt.Errorf("image %s: %w", s.name, cerr)
	}
	rel := ImagesDir + "/" + s.name
	s.w.sinkMu.Lock()
	defer s.w.sinkMu.Unlock()
	s.w.sums[rel] = FileSum{Path: rel, Size: s.n, SHA256: hex.EncodeToString(s.h.Sum(nil))}
	return nil
}
