package criurun

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net/netip"
	"sync"

	"github.com/checkpoint-restore/go-criu/v7/crit/images/fdinfo"
	sk_inet "github.com/checkpoint-restore/go-criu/v7/crit/images/sk-inet"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/stasis-k8s/stasis/checkpoint"
)

// Fixes counts what FixingSource changed.
type Fixes struct {
	// Timers re-armed (fixTimerfd).
	Timers int
	// UDP sockets whose local address was left to the new pod (fixConnectedUDP).
	UDP int
}

// fixTimerfd works around a CRIU 4.2.1 bug that stops an app's periodic timers for good.
//
// A periodic timerfd that expired while the tree was frozen (the app had not read it yet) is not
// re-armed by the kernel until it is read, and reports it_value 0 with its pending ticks. CRIU
// records exactly that and restores it with timerfd_settime(it_value 0), which disarms the timer,
// then sets the ticks: the app reads them once and its timer never fires again (measured: an
// event loop on a 20 ms timerfd restored stuck in epoll_wait in about half the restores, fdinfo
// "ticks: 0, it_value: (0, 0), it_interval: (0, 20000000)"). It is what an ordinary dump meets
// whenever a period is shorter than the time the dump takes.
//
// This rewrites such an entry to expire one period after the restore, as the kernel would have
// re-armed it on the read. A timer the app disarmed has no pending ticks and is left alone.
func fixTimerfd(fe *fdinfo.FileEntry) bool {
	t := fe.GetTfd()
	if fe.GetType() != fdinfo.FdTypes_TIMERFD || t == nil || t.GetVsec() != 0 || t.GetVnsec() != 0 ||
		(t.GetIsec() == 0 && t.GetInsec() == 0) || t.GetTicks() == 0 || t.GetSettimeFlags()&unix.TFD_TIMER_ABSTIME != 0 {
		return false
	}
	t.Vsec, t.Vnsec = proto.Uint64(t.GetIsec()), proto.Uint64(t.GetInsec())
	return true
}

// fixConnectedUDP lets a connected UDP socket restore in a pod with another IP.
//
// connect() on a UDP socket gives it the pod's IP as local address, and CRIU restores it by binding
// that address again before connecting: in the new pod the IPv4 bind fails the restore (measured:
// "inet: Can't bind inet socket (id 8): Cannot assign requested address", a cold start), and IPv6
// binds with IP_FREEBIND (CRIU's inet_bind), sending from an address the replies never reach. The local address is not the app's choice (a bound socket is
// refused at dump: agent/sockets.go), so it is cleared: CRIU binds the wildcard with the same
// port, connect() picks the new pod's address, as it did in the old pod.
func fixConnectedUDP(fe *fdinfo.FileEntry) bool {
	sk := fe.GetIsk()
	if fe.GetType() != fdinfo.FdTypes_INETSK || sk == nil || sk.GetDstPort() == 0 ||
		(sk.GetProto() != unix.IPPROTO_UDP && sk.GetProto() != unix.IPPROTO_UDPLITE) {
		return false
	}
	a, ok := imageAddr(sk)
	if !ok || a.IsUnspecified() || a.Unmap().IsLoopback() {
		return false
	}
	sk.SrcAddr = make([]uint32, len(sk.SrcAddr))
	return true
}

// imageAddr is the local address of a socket in CRIU's image (32-bit words in network order as
// the kernel stores them, read by CRIU as host integers).
func imageAddr(sk *sk_inet.InetSkEntry) (netip.Addr, bool) {
	raw := make([]byte, 0, 16)
	for _, w := range sk.GetSrcAddr() {
		raw = binary.LittleEndian.AppendUint32(raw, w)
	}
	switch {
	case sk.GetFamily() == unix.AF_INET && len(raw) >= 4:
		return netip.AddrFrom4([4]byte(raw[:4])), true
	case sk.GetFamily() == unix.AF_INET6 && len(raw) == 16:
		return netip.AddrFrom16([16]byte(raw)), true
	}
	return netip.Addr{}, false
}

// fixFiles rewrites an image of FileEntry records: two magic words, then records each preceded
// by its length (32 bits, little-endian). Records no fix applies to are copied byte for byte.
func fixFiles(data []byte) ([]byte, Fixes, error) {
	var fx Fixes
	if len(data) < 8 {
		return nil, fx, fmt.Errorf("files.img: %d bytes, no header", len(data))
	}
	out := append([]byte(nil), data[:8]...)
	for off := 8; off < len(data); {
		if off+4 > len(data) {
			return nil, fx, fmt.Errorf("files.img: truncated record at %d", off)
		}
		size := int(binary.LittleEndian.Uint32(data[off:]))
		if off+4+size > len(data) {
			return nil, fx, fmt.Errorf("files.img: record at %d of %d bytes overruns the image", off, size)
		}
		rec := data[off+4 : off+4+size]
		off += 4 + size
		var fe fdinfo.FileEntry
		if err := proto.Unmarshal(rec, &fe); err != nil {
			return nil, fx, fmt.Errorf("files.img: %w", err)
		}
		timer, udp := fixTimerfd(&fe), fixConnectedUDP(&fe)
		if timer || udp {
			b, err := proto.Marshal(&fe)
			if err != nil {
				return nil, fx, err
			}
			rec = b
		}
		if timer {
			fx.Timers++
		}
		if udp {
			fx.UDP++
		}
		out = binary.LittleEndian.AppendUint32(out, uint32(len(rec)))
		out = append(out, rec...)
	}
	return out, fx, nil
}

// FixingSource serves a checkpoint's images with files.img adapted to the pod it is restored
// into (see fixTimerfd and fixConnectedUDP), applied to the verified image in memory as the
// streamer serves it. Fixes reports what was changed once CRIU read it.
type FixingSource struct {
	checkpoint.ImageSource

	mu    sync.Mutex
	fixes Fixes
}

func (s *FixingSource) Open(name string) (io.ReadCloser, error) {
	r, err := s.ImageSource.Open(name)
	if err != nil || name != "files.img" {
		return r, err
	}
	defer r.Close()
	// files.img holds one small record per open file: a few hundred KiB at most.
	const most = 64 << 20
	data, err := io.ReadAll(io.LimitReader(r, most+1))
	if err == nil && len(data) > most {
		err = fmt.Errorf("larger than %d MiB", most>>20)
	}
	if err != nil {
		return nil, fmt.Errorf("images: %s: %w", name, err)
	}
	out, fx, err := fixFiles(data)
	if err != nil {
		return nil, err
	}
	if fx == (Fixes{}) {
		out = data
	}
	s.mu.Lock()
	s.fixes = fx
	s.mu.Unlock()
	return io.NopCloser(bytes.NewReader(out)), nil
}

// Fixes is what Open changed in files.img.
func (s *FixingSource) Fixes() Fixes {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.fixes
}
