package checkpoint

import (
	"fmt"
	"io"
	"runtime"
	"syscall"
	"testing"
	"time"
)

// cpuTime is the CPU time (user + system) the process used so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportCPU adds MB per CPU-second: the machine is shared, so wall-clock MB/s says how loaded it
// was as much as how fast the code is.
func reportCPU(b *testing.B, bytes int64, cpu time.Duration) {
	b.ReportMetric(float64(bytes)*float64(b.N)/cpu.Seconds()/1e6, "MB/cpu-s")
}

// The measurements behind DefaultCodec, DefaultChunkSize and encryption by default
// (docs/agent.md, "Checkpoint store"). Run:
//
//	go test -run '^$' -bench 'Pack' -benchtime 3x ./checkpoint/
//
// BenchmarkPackSeal is one core's work per chunk (zero check, HMAC, compression, encryption);
// BenchmarkPackWrite the whole writer (workers, chunk files written and fdatasynced on the test's
// disk, commit); BenchmarkPackRead the reader (decrypt, decompress, HMAC) from the page cache.
// Each reports MB/s of image bytes and ratio = bytes on disk / image bytes.

const benchHeap = 64 << 20

var benchHeaps = map[string]func(int, uint64) []byte{"random": randomHeap, "json": jsonHeap}

func benchCases(f func(b *testing.B, heap []byte, opt PackOptions)) func(b *testing.B) {
	return func(b *testing.B) {
		for _, hn := range []string{"random", "json"} {
			heap := benchHeaps[hn](benchHeap, 1)
			for _, codec := range []Codec{CodecS2, CodecZstd, CodecRaw} {
				for _, plain := range []bool{false, true} {
					for _, cs := range []int{64 << 10, 256 << 10, 1 << 20} {
						opt := PackOptions{Codec: codec, Plain: plain, ChunkSize: cs}
						name := fmt.Sprintf("%s/%s/encrypt=%v/chunk=%dK", hn, codec, !plain, cs>>10)
						b.Run(name, func(b *testing.B) { f(b, heap, opt) })
					}
				}
			}
		}
	}
}

func BenchmarkPackSeal(b *testing.B) {
	benchCases(func(b *testing.B, heap []byte, opt PackOptions) {
		ring := testRing(b)
		var dk *dataKey
		if !opt.Plain {
			dk, _, _ = ring.newDataKey("ns")
		}
		buf := make([]byte, 0, 2*opt.ChunkSize+1024)
		b.SetBytes(int64(len(heap)))
		var stored int64
		for b.Loop() {
			stored = 0
			for off := 0; off < len(heap); off += opt.ChunkSize {
				c := heap[off:min(off+opt.ChunkSize, len(heap))]
				if allZero(c) {
					continue
				}
				name := ring.namer(NamingBLAKE3).name(c)
				stored += int64(len(sealChunk(buf, opt.Codec, dk, name, c)))
			}
		}
		b.ReportMetric(float64(stored)/float64(len(heap)), "ratio")
	})(b)
}

func BenchmarkPackWrite(b *testing.B) {
	benchCases(func(b *testing.B, heap []byte, opt PackOptions) {
		b.SetBytes(int64(len(heap)))
		var stored int64
		cpu0 := cpuTime()
		for b.Loop() {
			dir := b.TempDir()
			ckpt, err := packCheckpoint(b, dir, time.Now(), opt, map[string][]byte{"pages-1.img": heap})
			if err != nil {
				b.Fatal(err)
			}
			m, _ := ReadManifest(ckpt)
			stored = m.Pack.Stored
		}
		reportCPU(b, int64(len(heap)), cpuTime()-cpu0)
		b.ReportMetric(float64(stored)/float64(len(heap)), "ratio")
	})(b)
}

func BenchmarkPackRead(b *testing.B) {
	benchCases(func(b *testing.B, heap []byte, opt PackOptions) {
		ckpt, err := packCheckpoint(b, b.TempDir(), time.Now(), opt, map[string][]byte{"pages-1.img": heap})
		if err != nil {
			b.Fatal(err)
		}
		_, r := openPacked(b, ckpt)
		b.SetBytes(int64(len(heap)))
		cpu0 := cpuTime()
		for b.Loop() {
			rc, err := r.Open("pages-1.img")
			if err != nil {
				b.Fatal(err)
			}
			n, err := io.CopyBuffer(io.Discard, rc, make([]byte, 1<<20))
			rc.Close()
			if err != nil || n != int64(len(heap)) {
				b.Fatal(err, n)
			}
		}
		reportCPU(b, int64(len(heap)), cpuTime()-cpu0)
	})(b)
}

// threadCPU is the CPU time of the calling thread (locked to it).
func threadCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(1 /* RUSAGE_THREAD */, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkPackEncryptionCost seals the same heap with and without encryption, alternately, on
// one locked thread, and reports the extra CPU time of encryption (best of b.N rounds each): the
// figure that decides encryption by default.
func BenchmarkPackEncryptionCost(b *testing.B) {
	ring := testRing(b)
	dk, _, _ := ring.newDataKey("ns")
	for _, hn := range []string{"random", "json"} {
		heap := benchHeaps[hn](32<<20, 1)
		b.Run(hn, func(b *testing.B) {
			runtime.LockOSThread() // each sub-benchmark runs on a goroutine of its own
			defer runtime.UnlockOSThread()
			buf := make([]byte, 0, 2*DefaultChunkSize+1024)
			best := map[bool]time.Duration{true: time.Hour, false: time.Hour}
			for b.Loop() {
				for _, k := range []*dataKey{dk, nil} {
					start := threadCPU()
					for off := 0; off < len(heap); off += DefaultChunkSize {
						c := heap[off:min(off+DefaultChunkSize, len(heap))]
						if !allZero(c) {
							sealChunk(buf, DefaultCodec, k, ring.namer(NamingBLAKE3).name(c), c)
						}
					}
					best[k != nil] = min(best[k != nil], threadCPU()-start)
				}
			}
			b.ReportMetric(float64(len(heap))/best[true].Seconds()/1e6, "enc-MB/cpu-s")
			b.ReportMetric(float64(len(heap))/best[false].Seconds()/1e6, "plain-MB/cpu-s")
			b.ReportMetric(100*(best[true].Seconds()/best[false].Seconds()-1), "cost-%")
		})
	}
}
