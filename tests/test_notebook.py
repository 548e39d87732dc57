"""notebooks/deepmarc_colab.ipynb runs top to bottom (small settings, CPU), so it cannot rot."""
import pytest

from tests.conftest import REPO

NOTEBOOK = REPO / 'notebooks' / 'deepmarc_colab.ipynb'


@pytest.mark.slow
def test_the_colab_notebook_runs_top_to_bottom(monkeypatch, tmp_path):
  import nbclient  # pylint: disable=g-import-not-at-top
  import nbformat  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('DEEPMARC_NOTEBOOK_SMALL', '1')
  monkeypatch.setenv('DEEPMARC_NOTEBOOK_WORKDIR', str(tmp_path))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=900, kernel_name='python3',
                                   resources={'metadata': {'path': str(REPO)}})
  client.execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == 'code'
             for o in cell.get('outputs', [])]
  text = ''.join(o.get('text', '') for o in outputs if o.get('output_type') == 'stream')
  assert 'small settings: True' in text
  assert 'segm@GT' in text  # the demo's table, with masks from GT boxes
  assert 'default: seen' in text and 'hourglass10: seen' in text
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) == 2  # the masks-from-boxes grid and the sweep's plot
