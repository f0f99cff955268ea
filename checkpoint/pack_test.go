package checkpoint

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/agentapi"
)

var testRingKey = Key("stasis test manifest key, 32 bytes or more")

func testRing(t testing.TB) *KeyRing {
	t.Helper()
	r, err := NewKeyRing(testRingKey, nil)
	require.NoError(t, err)
	return r
}

// randomHeap is incompressible memory.
func randomHeap(n int, seed uint64) []byte {
	b := make([]byte, n)
	r := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)})
	_, _ = r.Read(b)
	return b
}

// jsonHeap is a realistic heap: JSON documents of strings and numbers as a Python or Node
// service holds them, some pages of zeros between (freed, never touched again).
func jsonHeap(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 7))
	words := []string{"order", "customer", "status", "shipped", "pending", "amount", "currency", "EUR", "USD",
		"address", "street", "city", "Berlin", "Paris", "items", "sku", "quantity", "price", "created", "updated"}
	var buf bytes.Buffer
	for buf.Len() < n {
		if r.IntN(40) == 0 {
			buf.Write(make([]byte, 4096*(1+r.IntN(8))))
			continue
		}
		doc := map[string]any{
			"id": r.Int64(), "customer": fmt.Sprintf("%s-%d", words[r.IntN(len(words))], r.IntN(100000)),
			"status": words[r.IntN(len(words))], "amount": r.Float64() * 1000, "tags": []string{words[r.IntN(len(words))], words[r.IntN(len(words))]},
			"created": time.Unix(1700000000+r.Int64N(1e7), 0).UTC().Format(time.RFC3339), "note": fmt.Sprintf("%x", r.Uint64()),
		}
		b, _ := json.Marshal(doc)
		buf.Write(b)
		buf.WriteByte('\n')
	}
	return buf.Bytes()[:n]
}

// packCheckpoint writes a checkpoint whose images are streamed into a pack, in pieces of odd
// sizes as a stream delivers them.
func packCheckpoint(t testing.TB, dir string, at time.Time, opt PackOptions, images map[string][]byte) (string, error) {
	t.Helper()
	return packCheckpointWith(t, testRing(t), dir, at, opt, images)
}

func packCheckpointWith(t testing.TB, ring *KeyRing, dir string, at time.Time, opt PackOptions, images map[string][]byte) (string, error) {
	t.Helper()
	w, err := Begin(dir, NewID(at))
	require.NoError(t, err)
	w.Key = ring.Manifest()
	sink, err := w.Pack(ring, "ns1", opt)
	require.NoError(t, err)
	for _, name := range sortedKeys(images) {
		if err := writeImage(sink, name, images[name]); err != nil {
			_, aerr := w.Abort(false)
			require.NoError(t, aerr)
			return "", err
		}
	}
	if err := w.Commit(&Manifest{Container: "app", Pod: agentapi.PodRef{Namespace: "ns1", Name: "p"}}); err != nil {
		_, aerr := w.Abort(false)
		require.NoError(t, aerr)
		return "", err
	}
	require.NoError(t, w.Close())
	return w.Final(), nil
}

func writeImage(sink ImageSink, name string, data []byte) error {
	wc, err := sink.Create(name)
	if err != nil {
		return err
	}
	// As the streamer does: the head by Write, in uneven pieces, the rest by ReadFrom, from a
	// reader as uneven as a pipe.
	off := 0
	for step := 7777; off < min(len(data), 1<<20); off, step = min(off+step, len(data)), step*3%65536+1 {
		if _, err := wc.Write(data[off:min(off+step, len(data))]); err != nil {
			wc.Close()
			return err
		}
	}
	if _, err := wc.(io.ReaderFrom).ReadFrom(&unevenReader{data: data[off:], step: 4099}); err != nil {
		wc.Close()
		return err
	}
	return wc.Close()
}

// unevenReader returns data in pieces of changing sizes.
type unevenReader struct {
	data []byte
	step int
}

func (r *unevenReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, io.EOF
	}
	r.step = r.step*5%200000 + 1
	n := copy(p[:min(len(p), r.step)], r.data)
	r.data = r.data[n:]
	return n, nil
}

func sortedKeys(m map[string][]byte) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	for i := range out {
		for j := i + 1; j < len(out); j++ {
			if out[j] < out[i] {
				out[i], out[j] = out[j], out[i]
			}
		}
	}
	return out
}

// openPacked verifies checkpoint ckpt and opens its pack.
func openPacked(t testing.TB, ckpt string) (*Manifest, *PackReader) {
	t.Helper()
	d, err := os.Open(ckpt)
	require.NoError(t, err)
	defer d.Close()
	m, err := CheckAt(d, filepath.Base(ckpt), testRingKey)
	require.NoError(t, err)
	parent, err := os.Open(filepath.Dir(ckpt))
	require.NoError(t, err)
	defer parent.Close()
	r, err := OpenPack(parent, m, testRing(t))
	require.NoError(t, err)
	t.Cleanup(func() { r.Close() })
	return m, r
}

func readAllImage(r *PackReader, name string) ([]byte, error) {
	rc, err := r.Open(name)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	return io.ReadAll(rc)
}

func TestPackRoundTrip(t *testing.T) {
	heaps := map[string][]byte{
		"pages-1.img": randomHeap(3<<20+123, 1),
		"pages-2.img": jsonHeap(5<<20, 2),
		"core-1.img":  []byte("a small image"),
		"empty.img":   nil,
		"zero.img":    make([]byte, 1<<20),
	}
	for _, opt := range []PackOptions{{}, {Codec: CodecZstd}, {Plain: true}, {ChunkSize: 64 << 10, Codec: CodecRaw}} {
		t.Run(fmt.Sprintf("%s-plain=%v-%d", opt.withDefaults().Codec, opt.Plain, opt.withDefaults().ChunkSize), func(t *testing.T) {
			ckpt, err := packCheckpoint(t, t.TempDir(), time.Now(), opt, heaps)
			require.NoError(t, err)
			m, r := openPacked(t, ckpt)
			require.ElementsMatch(t, sortedKeys(heaps), r.Names())
			for name, want := range heaps {
				got, err := readAllImage(r, name)
				require.NoError(t, err, name)
				require.True(t, bytes.Equal(want, got), "%s: read back differs", name)
				ra, size, err := r.OpenAt(name)
				require.NoError(t, err)
				require.EqualValues(t, len(want), size)
				for _, off := range []int64{0, 4095, 256<<10 - 10, int64(len(want)) / 2} {
					if off >= size {
						continue
					}
					p := make([]byte, min(10000, size-off))
					n, err := ra.ReadAt(p, off)
					require.NoError(t, err)
					require.Equal(t, want[off:off+int64(n)], p[:n])
				}
				// A read spanning many chunks (fetched side by side) and one past the end.
				if size > 0 {
					p := make([]byte, 3<<20)
					n, err := ra.ReadAt(p, 1000%size)
					if 1000%size+int64(len(p)) > size {
						require.ErrorIs(t, err, io.EOF)
					} else {
						require.NoError(t, err)
					}
					require.Equal(t, want[1000%size:1000%size+int64(n)], p[:n])
					_, err = ra.ReadAt(p[:1], size)
					require.ErrorIs(t, err, io.EOF)
				}
				require.NoError(t, ra.Close())
			}
			require.NoError(t, r.Verify(context.Background()))
			_, err = r.Open("missing.img")
			require.ErrorIs(t, err, os.ErrNotExist)
			require.Greater(t, m.Pack.Stored, int64(0))
			if !opt.Plain {
				require.Len(t, m.Pack.Keys, 1)
			}
		})
	}
}
