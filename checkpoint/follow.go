package checkpoint

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/internal/confine"
)

// follower hashes the images while CRIU writes them and, beside it, makes them durable as they
// grow, so that Commit finds them hashed and almost all on disk. Done after the dump, the sha256
// and fsync of 1 GiB of images took three times as long as the dump itself (make bench);
// overlapped with it (CRIU is single-threaded, the hash runs on another core) only their tail is
// left.
//
// It relies on CRIU writing every image once, front to back (buffered image writes, and splice at
// the file position for the pages images); an image whose size differs from what was hashed fails
// the checkpoint, and restore-prepare checks every sha256 again before a restore.
type follower struct {
	dir  *os.File        // the images directory (the writer's descriptor)
	skip map[string]bool // files in dir that are not images (CRIU's log, moved after the dump)

	files  map[string]*followed
	stop   chan struct{}
	done   chan error    // the hasher's result
	wbDone chan struct{} // the writeback goroutine has returned
	wbErr  error         // its first error, read after wbDone
	hashed atomic.Int64  // bytes hashed so far
}

type followed struct {
	f   *os.File
	h   hash.Hash
	off int64 // bytes hashed
}

// followPoll is how long the follower waits when it has caught up with CRIU; syncChunk is how much
// an image must have grown before it is synced again.
const (
	followPoll = 2 * time.Millisecond
	syncChunk  = 8 << 20
)

func startFollower(dir *os.File, skip ...string) *follower {
	fl := &follower{dir: dir, skip: map[string]bool{}, files: map[string]*followed{},
		stop: make(chan struct{}), done: make(chan error, 1), wbDone: make(chan struct{})}
	for _, s := range skip {
		fl.skip[s] = true
	}
	go fl.run()
	go fl.writeback()
	return fl
}

// writeback fdatasyncs each image every syncChunk it grows, so the fsync in Commit only waits for
// the last chunk. Measured on virtio disks: starting the writeback alone (sync_file_range) left
// 0.5 s of fsync per GiB after the dump, because the cost is in the device's cache flush (the
// host writing out its own cache); an fdatasync per chunk spreads those flushes over the dump
// (0.1 s left). It runs beside the hasher, which would otherwise wait for the disk. Its errors
// fail the checkpoint: a later fsync on another descriptor would not report them again.
func (fl *follower) writeback() {
	defer close(fl.wbDone)
	synced := map[string]int64{}
	files := map[string]*os.File{}
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	for {
		progressed := false
		names, _ := fl.images()
		for _, name := range names {
			f := files[name]
			if f == nil {
				var err error
				if f, err = fl.open(name); err != nil {
					continue
				}
				files[name] = f
			}
			fi, err := f.Stat()
			if err != nil || fi.Size()-synced[name] < syncChunk {
				continue
			}
			if err := unix.Fdatasync(int(f.Fd())); err != nil {
				fl.wbErr = fmt.Errorf("fdatasync %s: %w", name, err)
				return
			}
			synced[name] = fi.Size()
			progressed = true
		}
		select {
		case <-fl.stop:
			return
		default:
		}
		if !progressed {
			select {
			case <-fl.stop:
				return
			case <-time.After(followPoll):
			}
		}
	}
}

func (fl *follower) run() {
	buf := make([]byte, 1<<20)
	for {
		progressed, err := fl.pass(buf)
		if err != nil {
			fl.done <- err
			return
		}
		select {
		case <-fl.stop:
			// The writer has exited: a last pass reads every image to its end.
			_, err := fl.pass(buf)
			fl.done <- err
			return
		default:
		}
		if !progressed {
			select {
			case <-fl.stop:
			case <-time.After(followPoll):
			}
		}
	}
}

// images lists the images written so far (names only: open checks each is a regular file, by
// descriptor; a stat of every entry every poll would cost the dump a core).
func (fl *follower) images() ([]string, error) {
	entries, err := confine.ReadDirNames(fl.dir)
	var names []string
	for _, n := range entries {
		if !fl.skip[n] {
			names = append(names, n)
		}
	}
	return names, err
}

// open opens an image by name in the images directory: never through a symlink, a regular file
// only (O_NONBLOCK: a FIFO swapped in must not block the follower).
func (fl *follower) open(name string) (*os.File, error) {
	f, err := confine.OpenEntry(fl.dir, name, unix.O_RDONLY|unix.O_NONBLOCK)
	if err != nil {
		return nil, err
	}
	if st, err := confine.Stat(f); err != nil || !confine.IsReg(&st) {
		f.Close()
		return nil, fmt.Errorf("%s: not a regular file", name)
	}
	return f, nil
}

// pass hashes what was appended to every image since the last pass.
func (fl *follower) pass(buf []byte) (progressed bool, err error) {
	names, err := fl.images()
	if err != nil {
		return false, err
	}
	for _, name := range names {
		ff := fl.files[name]
		if ff == nil {
			f, err := fl.open(name)
			if err != nil {
				return progressed, err
			}
			ff = &followed{f: f, h: sha256.New()}
			fl.files[name] = ff
		}
		for {
			n, err := ff.f.Read(buf)
			if n > 0 {
				progressed = true
				ff.h.Write(buf[:n])
				ff.off += int64(n)
				fl.hashed.Add(int64(n))
			}
			if errors.Is(err, io.EOF) || (n == 0 && err == nil) {
				break
			}
			if err != nil {
				return progressed, fmt.Errorf("reading %s while CRIU writes it: %w", name, err)
			}
		}
	}
	return progressed, nil
}

// finish stops following (the writer has exited) and returns the size and sha256 of every image,
// keyed by the path relative to the checkpoint ("images/<name>"). Each image's size is checked
// against the file: an image rewritten behind the follower cannot be told apart by its size
// alone, which is why restore-prepare hashes every file again.
func (fl *follower) finish() (map[string]FileSum, error) {
	close(fl.stop)
	err := <-fl.done
	<-fl.wbDone
	defer fl.close()
	if err := errors.Join(err, fl.wbErr); err != nil {
		return nil, err
	}
	out := make(map[string]FileSum, len(fl.files))
	for name, ff := range fl.files {
		fi, err := ff.f.Stat()
		if err != nil {
			return nil, err
		}
		if fi.Size() != ff.off {
			return nil, fmt.Errorf("%s changed while it was hashed: %d bytes hashed, %d on disk", name, ff.off, fi.Size())
		}
		rel := ImagesDir + "/" + name
		out[rel] = FileSum{Path: rel, Size: ff.off, SHA256: hex.EncodeToString(ff.h.Sum(nil))}
	}
	return out, nil
}

// abandon stops following without results (the dump failed).
func (fl *follower) abandon() {
	close(fl.stop)
	<-fl.done
	<-fl.wbDone
	fl.close()
}

func (fl *follower) close() {
	for _, ff := range fl.files {
		ff.f.Close()
	}
}
