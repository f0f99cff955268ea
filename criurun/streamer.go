package criurun

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/stasis-k8s/stasis/checkpoint"
)

// The streamer side of CRIU's image-streaming protocol (`criu dump|restore --stream`, CRIU 4.2's
// criu/img-streamer.c; the reference streamer is checkpoint-restore/criu-image-streamer):
//
//   - CRIU connects to <images dir>/streamer-capture.sock (dump) or streamer-serve.sock (restore),
//     a SOCK_STREAM unix socket, once; every CRIU process of the run (the restore forks one per
//     task) shares that connection under a lock.
//   - For every image it opens, CRIU sends the file name as an img_streamer_request_entry
//     {1: filename} prefixed by its length (32 bits, little-endian: CRIU's pb_write_one).
//   - Restore only: the streamer answers img_streamer_reply_entry {1: exists}, framed the same
//     way. exists=false is CRIU's "no such image" (optional images).
//   - CRIU then creates a pipe and sends the streamer's end (the read end at dump, the write end
//     at restore) as SCM_RIGHTS with one dummy byte. The image's bytes, exactly those of the
//     plain file (magic included), go through that pipe; closing it ends the image. CRIU writes
//     the pages with splice, so large pipes keep it going.
//   - There is no error message: a streamer that fails closes the pipe (CRIU sees EPIPE or a
//     short image) and the connection. CRIU closes the connection when it closes its images
//     directory at the end of the run.
//
// Files CRIU marks O_FORCE_LOCAL (stats-dump, stats-restore, irmap-cache) are written as plain
// files in the images directory instead, i.e. in the streamer's private directory.

// Socket names CRIU connects to in its images directory.
const (
	CaptureSocket = "streamer-capture.sock"
	ServeSocket   = "streamer-serve.sock"
)

// Stream tuning. pipeSize is what the pipes are enlarged to (F_SETPIPE_SZ: the default
// /proc/sys/fs/pipe-max-size, allowed to anyone); chunk is what is read or written per call.
const (
	pipeSize = 1 << 20
	chunk    = 1 << 20
	// directAfter: an image that has sent this much goes to the sink as it arrives (when no
	// other image holds the sink); smaller ones are buffered whole first (see capture).
	directAfter = 1 << 20
	// maxBuffered bounds what a capture holds in memory while an image waits for the sink.
	maxBuffered = 256 << 20
)

// ErrStreamAborted is the error of a stream stopped by its context.
var ErrStreamAborted = errors.New("image stream aborted")

// StreamStats counts what went through a stream.
type StreamStats struct {
	Images int
	Bytes  int64
}

// Stream is a streamer for one CRIU run, listening in an agent-private directory.
type Stream struct {
	ln     *net.UnixListener
	path   string
	failed chan struct{} // closed on the first error
	done   chan struct{} // the connection is over

	mu    sync.Mutex
	err   error
	conn  *net.UnixConn
	open  map[io.Closer]bool // image pipes and source readers in use, closed by fail
	stats StreamStats
	files sync.WaitGroup
	stop  func() bool // ends the context's watch
}

// Capture starts the streamer of a dump: every image CRIU sends goes to sink. dir is the private
// directory CRIU gets as its images directory (-D); owner, when set, is the user CRIU runs as
// (it must reach the socket). Call Finish once CRIU has exited.
func Capture(ctx context.Context, dir string, owner *Cred, sink checkpoint.ImageSink) (*Stream, error) {
	s, err := listen(ctx, filepath.Join(dir, CaptureSocket), owner)
	if err != nil {
		return nil, err
	}
	c := &capture{s: s, sink: sink, lane: make(chan struct{}, 1)}
	go s.accept(c.handle)
	return s, nil
}

// Serve starts the streamer of a restore: CRIU's requests are answered from src. See Capture.
func Serve(ctx context.Context, dir string, owner *Cred, src checkpoint.ImageSource) (*Stream, error) {
	s, err := listen(ctx, filepath.Join(dir, ServeSocket), owner)
	if err != nil {
		return nil, err
	}
	sv := &serve{s: s, src: src}
	go s.accept(sv.handle)
	return s, nil
}

func listen(ctx context.Context, path string, owner *Cred) (*Stream, error) {
	if len(path) >= 108 {
		return nil, fmt.Errorf("streamer socket %s: path too long for a unix socket", path)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("streamer socket: %w", err)
	}
	ln.SetUnlinkOnClose(true)
	if owner != nil {
		if err := os.Lchown(path, int(owner.UID), int(owner.GID)); err != nil {
			ln.Close()
			return nil, fmt.Errorf("streamer socket: %w", err)
		}
	}
	s := &Stream{ln: ln, path: path, failed: make(chan struct{}), done: make(chan struct{}), open: map[io.Closer]bool{}}
	s.stop = context.AfterFunc(ctx, func() { s.fail(fmt.Errorf("%w: %w", ErrStreamAborted, context.Cause(ctx))) })
	return s, nil
}

// accept takes CRIU's one connection and runs handle on it; no other connection is accepted.
func (s *Stream) accept(handle func(*net.UnixConn) error) {
	defer close(s.done)
	conn, err := s.ln.AcceptUnix()
	s.ln.Close()
	if err != nil {
		select {
		case <-s.failed:
		default:
			if !errors.Is(err, net.ErrClosed) {
				s.fail(fmt.Errorf("streamer: accept: %w", err))
			}
		}
		return
	}
	s.mu.Lock()
	s.conn = conn
	failed := s.err != nil
	s.mu.Unlock()
	if failed {
		conn.Close()
		return
	}
	if err := handle(conn); err != nil {
		s.fail(err)
	}
	s.files.Wait()
	conn.Close()
}

// Failed is closed when the stream fails: the caller stops CRIU if it does not stop by itself.
func (s *Stream) Failed() <-chan struct{} { return s.failed }

// fail records the first error and cuts CRIU off: the connection and every image pipe are closed,
// so CRIU's next write or read fails instead of waiting.
func (s *Stream) fail(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return
	}
	s.err = err
	close(s.failed)
	s.ln.Close()
	if s.conn != nil {
		s.conn.Close()
	}
	for c := range s.open {
		c.Close()
	}
}

// Finish ends the stream once CRIU has exited (it closed the connection and every pipe) and
// returns the stream's first error. A CRIU that never connected leaves nothing to wait for.
func (s *Stream) Finish() (StreamStats, error) {
	s.ln.Close()
	<-s.done
	s.stop()
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stats, s.err
}

// track registers what fail must close to stop an image's goroutine (false: failed already).
func (s *Stream) track(cs ...io.Closer) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return false
	}
	for _, c := range cs {
		s.open[c] = true
	}
	return true
}

// untrack ends an image of n bytes.
func (s *Stream) untrack(n int64, cs ...io.Closer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range cs {
		delete(s.open, c)
	}
	s.stats.Images++
	s.stats.Bytes += n
}

// readRequest reads CRIU's next request: the image's name. io.EOF: CRIU is done.
func readRequest(c *net.UnixConn) (string, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return "", err
	}
	n := binary.LittleEndian.Uint32(hdr[:])
	if n > 4096 {
		return "", fmt.Errorf("streamer: request of %d bytes", n)
	}
	msg := make([]byte, n)
	if _, err := io.ReadFull(c, msg); err != nil {
		return "", fmt.Errorf("streamer: request: %w", unexpected(err))
	}
	var name string
	for len(msg) > 0 {
		num, typ, l := protowire.ConsumeTag(msg)
		if l < 0 {
			return "", fmt.Errorf("streamer: bad request")
		}
		msg = msg[l:]
		if num == 1 && typ == protowire.BytesType {
			v, l := protowire.ConsumeBytes(msg)
			if l < 0 {
				return "", fmt.Errorf("streamer: bad request")
			}
			name, msg = string(v), msg[l:]
			continue
		}
		if l = protowire.ConsumeFieldValue(num, typ, msg); l < 0 {
			return "", fmt.Errorf("streamer: bad request")
		}
		msg = msg[l:]
	}
	// CRIU names its images plainly ("pages-1.img"): anything else is not an image name.
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") || len(name) > 255 {
		return "", fmt.Errorf("streamer: request for %q: not an image name", name)
	}
	return name, nil
}

// writeReply answers a restore request (img_streamer_reply_entry, exists is required).
func writeReply(c *net.UnixConn, exists bool) error {
	msg := protowire.AppendTag(nil, 1, protowire.VarintType)
	msg = protowire.AppendVarint(msg, protowire.EncodeBool(exists))
	out := binary.LittleEndian.AppendUint32(nil, uint32(len(msg)))
	_, err := c.Write(append(out, msg...))
	return err
}

// recvPipe receives the pipe end CRIU sends after a request (one dummy byte with SCM_RIGHTS),
// enlarged and non-blocking (so that closing it stops a goroutine blocked on it; the flag is
// ours alone, CRIU's end is another open file).
func recvPipe(c *net.UnixConn, name string) (*os.File, error) {
	b, oob := make([]byte, 1), make([]byte, unix.CmsgSpace(4*4))
	n, oobn, _, _, err := c.ReadMsgUnix(b, oob)
	if err == nil && n != 1 {
		err = io.ErrUnexpectedEOF
	}
	if err != nil {
		return nil, fmt.Errorf("streamer: %s: no pipe from CRIU: %w", name, unexpected(err))
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	var fds []int
	for _, m := range msgs {
		if f, ferr := unix.ParseUnixRights(&m); ferr == nil {
			fds = append(fds, f...)
		}
	}
	if err != nil || len(fds) != 1 {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return nil, fmt.Errorf("streamer: %s: expected one pipe from CRIU, got %d descriptors (%v)", name, len(fds), err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fds[0], &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFIFO {
		unix.Close(fds[0])
		return nil, fmt.Errorf("streamer: %s: CRIU sent something else than a pipe", name)
	}
	_, _ = unix.FcntlInt(uintptr(fds[0]), unix.F_SETPIPE_SZ, pipeSize)
	if err := unix.SetNonblock(fds[0], true); err != nil {
		unix.Close(fds[0])
		return nil, err
	}
	return os.NewFile(uintptr(fds[0]), name), nil
}

func unexpected(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// capture writes a dump's images into the sink, which takes one image at a time. CRIU keeps
// several images open at once and writes them in turns (files.img for the whole dump, pagemap-N
// beside pages-N, …), and blocks on a pipe nobody reads: every image is read at once into memory,
// and reaches the sink when it holds the sink's lane. The one large image of the moment (a
// process's pages) takes the lane once it passes directAfter and then streams through without
// being held; the small ones are handed over whole when they end. An image waiting for the lane
// keeps being read (CRIU may need to finish it before it ends the one holding the lane), up to
// maxBuffered in all: past that the dump fails rather than the agent's memory.
type capture struct {
	s        *Stream
	sink     checkpoint.ImageSink
	lane     chan struct{}
	buffered atomic.Int64
	seen     sync.Map // image names already sent
}

func (c *capture) handle(conn *net.UnixConn) error {
	for {
		name, err := readRequest(conn)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		p, err := recvPipe(conn, name)
		if err != nil {
			return err
		}
		if _, dup := c.seen.LoadOrStore(name, true); dup {
			p.Close()
			return fmt.Errorf("streamer: CRIU sent image %s twice", name)
		}
		if !c.s.track(p) {
			p.Close()
			return nil
		}
		c.s.files.Add(1)
		go func() {
			defer c.s.files.Done()
			n, err := c.file(name, p)
			p.Close()
			c.s.untrack(n, p)
			if err != nil {
				c.s.fail(err) // the sink's errors name their image (and offset); the pipe's are named here
			}
		}()
	}
}

// file reads one image from its pipe into the sink (see capture) and returns its size.
func (c *capture) file(name string, p *os.File) (int64, error) {
	var held []byte
	defer func() { c.buffered.Add(-int64(cap(held))) }()
	buf := make([]byte, 64<<10)
	for {
		n, err := p.Read(buf)
		if n > 0 {
			before := cap(held)
			held = append(held, buf[:n]...)
			if c.buffered.Add(int64(cap(held)-before)) > maxBuffered {
				return 0, fmt.Errorf("image %s: more than %d MiB of images waiting for the sink at once", name, maxBuffered>>20)
			}
		}
		if errors.Is(err, io.EOF) {
			return int64(len(held)), c.whole(name, held)
		}
		if err != nil {
			return 0, c.readErr(name, err)
		}
		if len(held) >= directAfter {
			select {
			case c.lane <- struct{}{}:
				defer func() { <-c.lane }()
				return c.direct(name, held, p)
			default:
			}
		}
	}
}

// readErr is a read error of image name's pipe, or nil when fail closed it (the stream's first
// error is recorded already).
func (c *capture) readErr(name string, err error) error {
	select {
	case <-c.s.failed:
		return nil
	default:
	}
	return fmt.Errorf("image %s: reading CRIU's pipe: %w", name, err)
}

// whole hands a complete small image to the sink.
func (c *capture) whole(name string, data []byte) error {
	select {
	case c.lane <- struct{}{}:
	case <-c.s.failed:
		return nil
	}
	defer func() { <-c.lane }()
	w, err := c.sink.Create(name)
	if err != nil {
		return err
	}
	if _, err := w.Write(data); err != nil {
		w.Close()
		return err
	}
	return w.Close()
}

// direct streams an image to the sink as CRIU writes it: a reader fills chunks from the pipe
// while the sink consumes the previous ones.
func (c *capture) direct(name string, head []byte, p *os.File) (int64, error) {
	w, err := c.sink.Create(name)
	if err != nil {
		return 0, err
	}
	n := int64(len(head))
	if _, err := w.Write(head); err != nil {
		w.Close()
		return 0, err
	}
	if rf, ok := w.(io.ReaderFrom); ok {
		return c.readInto(name, rf, w, p, n)
	}
	filled, free := make(chan []byte, 4), make(chan []byte, 6)
	for range cap(free) {
		free <- make([]byte, chunk)
	}
	var rerr error
	go func() {
		defer close(filled)
		for b := range free {
			k, err := io.ReadFull(p, b)
			if k > 0 {
				filled <- b[:k]
			}
			if err != nil {
				if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
					rerr = c.readErr(name, err)
				}
				return
			}
		}
	}()
	var werr error
	for b := range filled {
		if werr == nil {
			if _, werr = w.Write(b); werr != nil {
				p.Close() // CRIU's next write fails (EPIPE); the reader stops
			}
			n += int64(len(b))
		}
		free <- b[:cap(b)]
	}
	close(free)
	cerr := w.Close()
	if werr != nil {
		rerr = nil // the reader saw the pipe closed because of werr
		if errors.Is(cerr, werr) {
			cerr = nil // the sink's Close repeats its failure
		}
	}
	return n, errors.Join(werr, rerr, cerr)
}

// readInto streams the rest of image name from pipe p into a sink that reads for itself (the
// pack fills its chunks straight from the pipe: one copy fewer), n bytes already written.
func (c *capture) readInto(name string, rf io.ReaderFrom, w io.Closer, p *os.File, n int64) (int64, error) {
	pr := &pipeReader{p: p}
	k, err := rf.ReadFrom(pr)
	n += k
	if err != nil && err == pr.err {
		err = c.readErr(name, err) // the pipe's; nil when the stream failed first
	} else if err != nil {
		p.Close() // the sink's: CRIU's next write fails (EPIPE)
	}
	cerr := w.Close()
	if errors.Is(cerr, err) {
		cerr = nil // the sink's Close repeats its failure
	}
	return n, errors.Join(err, cerr)
}

// pipeReader remembers the pipe's own error (EOF is none), to tell it from the sink's.
type pipeReader struct {
	p   *os.File
	err error
}

func (r *pipeReader) Read(b []byte) (int, error) {
	k, err := r.p.Read(b)
	if err != nil && !errors.Is(err, io.EOF) {
		r.err = err
	}
	return k, err
}

// serve answers a restoring CRIU from the source, one goroutine per image (CRIU reads several at
// once, in turns).
type serve struct {
	s   *Stream
	src checkpoint.ImageSource
}

func (sv *serve) handle(conn *net.UnixConn) error {
	for {
		name, err := readRequest(conn)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		r, err := sv.src.Open(name)
		if errors.Is(err, fs.ErrNotExist) {
			if err := writeReply(conn, false); err != nil {
				return fmt.Errorf("streamer: %w", err)
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("image %s: %w", name, err)
		}
		if err := writeReply(conn, true); err != nil {
			r.Close()
			return fmt.Errorf("streamer: %w", err)
		}
		p, err := recvPipe(conn, name)
		if err != nil {
			r.Close()
			return err
		}
		if !sv.s.track(p, r) {
			r.Close()
			p.Close()
			return nil
		}
		sv.s.files.Add(1)
		go func() {
			defer sv.s.files.Done()
			n, err := io.CopyBuffer(p, struct{ io.Reader }{r}, make([]byte, chunk))
			r.Close()
			p.Close()
			sv.s.untrack(n, p, r)
			if err != nil && !errors.Is(err, syscall.EPIPE) {
				sv.s.fail(fmt.Errorf("image %s: %w", name, err))
			}
		}()
	}
}
