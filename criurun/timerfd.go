package criurun

import (
	"encoding/binary"
	"fmt"
	"os"

	"github.com/checkpoint-restore/go-criu/v7/crit/images/fdinfo"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

// RearmExpiredTimerfds works around a CRIU 4.2.1 bug that stops an app's periodic timers for good.
//
// A periodic timerfd that expired while the tree was frozen (the app had not read it yet) is not
// re-armed by the kernel until it is read, and reports it_value 0 with its pending ticks. CRIU
// records exactly that and restores it with timerfd_settime(it_value 0), which disarms the timer,
// then sets the ticks: the app reads them once and its timer never fires again (measured: an
// event loop on a 20 ms timerfd restored stuck in epoll_wait in about half the restores, fdinfo
// "ticks: 0, it_value: (0, 0), it_interval: (0, 20000000)"). It is what an ordinary dump meets
// whenever a period is shorter than the time the dump takes.
//
// This rewrites such entries of files.img (in the agent's private copy of the images, after their
// verification) to expire one period after the restore, as the kernel would have re-armed them on
// the read. A timer the app disarmed has no pending ticks and is left alone. It returns the number
// of timers re-armed.
func RearmExpiredTimerfds(images *os.File) (int, error) {
	const name = "files.img"
	fd, err := unix.Openat(int(images.Fd()), name, unix.O_RDWR|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err == unix.ENOENT {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("images: %s: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	data := make([]byte, st.Size())
	if _, err := f.ReadAt(data, 0); err != nil {
		return 0, fmt.Errorf("images: %s: %w", name, err)
	}
	out, n, err := rearmTimerfds(data)
	if err != nil || n == 0 {
		return 0, err
	}
	if err := f.Truncate(0); err != nil {
		return 0, err
	}
	if _, err := f.WriteAt(out, 0); err != nil {
		return 0, fmt.Errorf("images: %s: %w", name, err)
	}
	return n, nil
}

// rearmTimerfds rewrites an image of FileEntry records: two magic words, then records each
// preceded by its length (32 bits, little-endian).
func rearmTimerfds(data []byte) ([]byte, int, error) {
	if len(data) < 8 {
		return nil, 0, fmt.Errorf("files.img: %d bytes, no header", len(data))
	}
	out := append([]byte(nil), data[:8]...)
	n := 0
	for off := 8; off < len(data); {
		if off+4 > len(data) {
			return nil, 0, fmt.Errorf("files.img: truncated record at %d", off)
		}
		size := int(binary.LittleEndian.Uint32(data[off:]))
		if off+4+size > len(data) {
			return nil, 0, fmt.Errorf("files.img: record at %d of %d bytes overruns the image", off, size)
		}
		rec := data[off+4 : off+4+size]
		off += 4 + size
		var fe fdinfo.FileEntry
		if err := proto.Unmarshal(rec, &fe); err != nil {
			return nil, 0, fmt.Errorf("files.img: %w", err)
		}
		t := fe.GetTfd()
		if fe.GetType() == fdinfo.FdTypes_TIMERFD && t != nil && t.GetVsec() == 0 && t.GetVnsec() == 0 &&
			(t.GetIsec() != 0 || t.GetInsec() != 0) && t.GetTicks() > 0 && t.GetSettimeFlags()&unix.TFD_TIMER_ABSTIME == 0 {
			t.Vsec, t.Vnsec = proto.Uint64(t.GetIsec()), proto.Uint64(t.GetInsec())
			b, err := proto.Marshal(&fe)
			if err != nil {
				return nil, 0, err
			}
			rec = b
			n++
		}
		out = binary.LittleEndian.AppendUint32(out, uint32(len(rec)))
		out = append(out, rec...)
	}
	return out, n, nil
}
